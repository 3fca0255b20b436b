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
import os
from typing import Any, Callable

from cnn import config as config_lib

RESULTS_FILE = 'sweep_results.jsonl'
SPEC_FILE = 'sweep.json'
RUNS_DIR = 'runs'
RUN_FILE = 'sweep_run.json'  # in each run's folder: the drawn values, written at draw time
METRICS_FILE = 'metrics.jsonl'  # in each run's folder, written by the training run
REPORT_DIR = 'report'
RUN_LOCK = '.sweep_run.lock'  # in each run's folder, held while it trains: free = interrupted
SWEEP_LOCK = '.sweep.lock'  # held while a worker reads or changes what is drawn and ended


class SweepError(config_lib.ConfigError):
  """A sweep spec, sweep values or sweep workdir that cannot work; the message says what to do."""


def run_dir(workdir: str, name: str) -> str:
  """The run's own workdir; records store it relative to WORKDIR (`runs/<name>`)."""
  return os.path.join(workdir, RUNS_DIR, name)


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str, key: Callable[[dict], Any]) -> list[dict]:
  """The rows of a JSON-lines file, one per `key` (the last line wins), sorted by it.

  A line that is not JSON is skipped: one cut short by a kill, or being written right now.
  """
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows[key(row)] = row
  return [rows[k] for k in sorted(rows)]


def read_spec(workdir: str) -> dict | None:
  """sweep.json ({'spec', 'base_config', 'created'}), or None before the sweep's first start."""
  return _read_json(os.path.join(workdir, SPEC_FILE))


def read_results(workdir: str) -> list[dict]:
  """The ended runs of WORKDIR/sweep_results.jsonl, one per run, by draw index."""
  rows = _read_jsonl(os.path.join(workdir, RESULTS_FILE), lambda r: r['run'])
  return sorted(rows, key=lambda r: r['index'])


def read_metrics(run_dir_path: str) -> list[dict]:
  """The epochs of a run's metrics.jsonl, one per epoch (the last line wins), in order."""
  return _read_jsonl(os.path.join(run_dir_path, METRICS_FILE), lambda r: r['epoch'])


def read_claims(workdir: str) -> list[dict]:
  """Every drawn run's sweep_run.json (ended or not), by draw index."""
  root = os.path.join(workdir, RUNS_DIR)
  names = os.listdir(root) if os.path.isdir(root) else []
  claims = [_read_json(os.path.join(run_dir(workdir, name), RUN_FILE)) for name in names]
  return sorted((c for c in claims if c is not None), key=lambda c: c['index'])
