"""An offline sweep's workdir: where each file lives, and reading them back.

    WORKDIR/sweep.json             the effective sweep spec and base config (reruns must match)
    WORKDIR/sweep_results.jsonl    one line per ended run: params, config, val_acc, state, ...
    WORKDIR/runs/<run name>/       the run's workdir (config.json, metrics.jsonl, checkpoints)
                                   plus sweep_run.json, written when the run is drawn
    WORKDIR/report/                plots and summary.md (cnn.sweep_report)

cnn.sweep writes these files and cnn.sweep_report reads them; both go through this module, so
neither needs the other to find a file.
"""

import json
import logging
import os

from cnn import config as config_lib

RESULTS_FILE = 'sweep_results.jsonl'
SPEC_FILE = 'sweep.json'
RUNS_DIR = 'runs'
RUN_FILE = 'sweep_run.json'  # in each run's folder: the drawn values, written at draw time
METRICS_FILE = 'metrics.jsonl'  # in each run's folder, written by cnn.train
REPORT_DIR = 'report'
_RUN_LOCK = '.sweep_run.lock'  # held while the run trains: a free lock means it was interrupted
_SWEEP_LOCK = '.sweep.lock'


class SweepError(config_lib.ConfigError):
  """A sweep spec, sweep values or sweep workdir that cannot work; the message says what to do."""


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def spec_path(workdir: str) -> str:
  return os.path.join(workdir, SPEC_FILE)


def sweep_lock_path(workdir: str) -> str:
  """Held while a worker reads or changes what the sweep has drawn and ended."""
  return os.path.join(workdir, _SWEEP_LOCK)


def run_dir(workdir: str, name: str) -> str:
  """The run's own workdir; records store it relative to WORKDIR (`runs/<name>`)."""
  return os.path.join(workdir, RUNS_DIR, name)


def run_file_path(workdir: str, name: str) -> str:
  return os.path.join(run_dir(workdir, name), RUN_FILE)


def run_lock_path(workdir: str, name: str) -> str:
  return os.path.join(run_dir(workdir, name), _RUN_LOCK)


def report_dir(workdir: str) -> str:
  return os.path.join(workdir, REPORT_DIR)


def read_spec(workdir: str) -> dict | None:
  """sweep.json ({'spec', 'base_config', 'created'}), or None before the sweep's first start."""
  path = spec_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_results(workdir: str) -> list[dict]:
  """The ended runs of WORKDIR/sweep_results.jsonl, one per run (the last line wins)."""
  path = results_path(workdir)
  if not os.path.exists(path):
    return []
  by_run = {}
  with open(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning('%s line %d is not JSON (a write cut short?); ignored', path, i + 1)
        continue
      by_run.pop(record['run'], None)
      by_run[record['run']] = record
  return sorted(by_run.values(), key=lambda r: r.get('index', 0))


def read_metrics(run_dir_path: str) -> list[dict]:
  """The epochs of a run's metrics.jsonl, one per epoch (the last line wins), in order."""
  path = os.path.join(run_dir_path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  by_epoch = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line being written right now
      by_epoch[row.get('epoch', len(by_epoch) + 1)] = row
  return [by_epoch[e] for e in sorted(by_epoch)]


def read_claims(workdir: str) -> list[dict]:
  """Every drawn run's sweep_run.json (ended or not), by draw index."""
  root = os.path.join(workdir, RUNS_DIR)
  if not os.path.isdir(root):
    return []
  claims = []
  for name in os.listdir(root):
    path = run_file_path(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        claims.append(json.load(f))
  return sorted(claims, key=lambda c: c['index'])
