"""Hyperparameter sweeps: the `wandb agent` path, and the same sweeps offline on W&B's engine.

Under `wandb agent`, W&B's sweep controller picks each run's values and main.py applies them
(`agent_config`). Offline, `run_sweep` draws runs from the same YAML with the `sweeps`
package that W&B's controller runs (random, grid, bayes, hyperband), one run after another,
in a workdir laid out as cnn.sweep_files describes.

Several `run_sweep` processes may share one WORKDIR (file locks): together they draw
`sweep_count` runs. A run interrupted mid-training is resumed by the next invocation.
"""

import contextlib
import datetime
import difflib
import fcntl
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import yaml

from cnn import atomic
from cnn import config as config_lib
from cnn import sweep_files

# Redraws when random or bayes proposes values already run: a rerun of identical values with
# the same seed would only repeat a result.
_MAX_DRAWS = 50

TrainFn = Callable[..., dict]

SweepError = sweep_files.SweepError


# ---------------------------------------------------------------------------- names and values


def _plain(value: Any) -> Any:
  """`value` as JSON gives it back: numpy scalars (the engine's samples) become Python values."""
  return json.loads(json.dumps(value, default=lambda v: v.item()))


def apply_sweep_params(config: ml_collections.ConfigDict,
                       params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the sweep's values, each checked against its field's type.

  ConfigDict's typed assignment does the checking, and turns 1 into 1.0 for a float field and
  a list into a tuple for a tuple field. SweepError names an unknown key (with the closest field
  name) or a value that does not fit its field (0.5 for kernel_size).
  """
  new = config.copy_and_resolve_references()
  for name, value in params.items():
    if name not in new:
      close = difflib.get_close_matches(name, list(new.keys()), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise SweepError(f'sweep parameter {name!r}{hint} is not a config field')
    current = new[name]
    try:
      # Typed assignment lets None into any field and a bool into a number (True is an int).
      if value is None or isinstance(value, bool) != isinstance(current, bool):
        raise TypeError(name)
      new[name] = value
    except TypeError:
      raise SweepError(
          f'sweep parameter {name}={value!r} ({type(value).__name__}) does not fit the config '
          f'field {name} of type {type(current).__name__} (now {current!r})') from None
  return new


# ---------------------------------------------------------------------------- `wandb agent`


def load_agent_params(path: str) -> dict[str, Any]:
  """The values of one agent run, from either file `wandb agent` writes for it.

  `${args_json_file}` (wandb/sweep-ID/config-RUN.json) is a JSON object {parameter: value}, as
  wandb.sdk.launch.sweeps.utils.create_sweep_command_args dumps it; $WANDB_SWEEP_PARAM_PATH
  (config-RUN.yaml) is W&B's config file: `wandb_version: 1` and {parameter: {value: v}}.
  """
  try:
    with open(path) as f:
      text = f.read()
    params = yaml.safe_load(text) if path.endswith(('.yaml', '.yml')) else json.loads(text)
  except (OSError, ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
    raise SweepError(f'cannot read the sweep parameter file {path}: {e}') from None
  if not isinstance(params, dict):
    raise SweepError(f'{path}: expected a JSON object {{parameter: value}}, got '
                     f'{type(params).__name__}')
  if params.pop('wandb_version', None) is None:
    return params
  return {k: entry['value'] for k, entry in params.items()}


def agent_config(config: ml_collections.ConfigDict, sweep_params_path: str = '',
                 env: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
  """`config` with the values of a `wandb agent` run applied and the run named after them.

  The values come from `sweep_params_path` (--sweep_params=${args_json_file}), else from
  $WANDB_SWEEP_PARAM_PATH, which the agent sets for every run whatever the YAML's command;
  without either the config is returned unchanged.
  """
  env = os.environ if env is None else env
  path = sweep_params_path or env.get('WANDB_SWEEP_PARAM_PATH', '')
  if not path:
    return config
  config = apply_sweep_params(config, load_agent_params(path))
  if not config.run_name:
    config.run_name = config_lib.hyperparameter_name(config)
  return config


# ---------------------------------------------------------------------------- sweep specs


def load_sweep_config(path: str) -> dict:
  """The YAML's sweep spec, validated by the `sweeps` engine (the schema W&B's server uses)."""
  import jsonschema
  import sweeps
  try:
    with open(path) as f:
      spec = yaml.safe_load(f)
  except (OSError, yaml.YAMLError) as e:
    raise SweepError(f'cannot read sweep config {path}: {e}') from None
  if not isinstance(spec, dict):
    raise SweepError(f'{path}: a sweep config is a YAML mapping (method, metric, parameters)')
  try:
    return dict(sweeps.SweepConfig(spec))
  except (jsonschema.ValidationError, ValueError) as e:
    message = getattr(e, 'message', str(e))
    raise SweepError(f'{path} is not a valid W&B sweep config: {message}') from None


def _is_searched(spec: Mapping[str, Any]) -> bool:
  return 'value' not in spec and not ('values' in spec and len(spec['values']) == 1)


def _choices(spec: Mapping[str, Any]) -> list:
  """The values of a parameter that the checks try: each categorical value, a range's ends."""
  if 'value' in spec:
    return [spec['value']]
  return list(spec.get('values') or [spec[k] for k in ('min', 'max') if k in spec])


def check_parameters(spec: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
  """SweepError unless every parameter is a config field that may vary between runs, and every
  value it can take (of a range: both ends) fits the field."""
  params = spec['parameters']
  if 'early_terminate' in spec and 'metric' not in spec:
    raise SweepError('early_terminate needs a metric section (e.g. name: val_acc, goal: maximize)')
  bad = sorted(set(params) & config_lib.UNSWEEPABLE_FIELDS)
  if bad:
    raise SweepError(f'{", ".join(bad)} cannot be swept: every run of a sweep shares them '
                     f'(one decoded-image cache, one W&B project); set them with --config.FIELD')
  for name, p in params.items():
    for value in _choices(p):
      apply_sweep_params(config, {name: value})


def pin_overrides(spec: Mapping[str, Any], config: ml_collections.ConfigDict,
                  overrides: Sequence[str]) -> dict:
  """The spec with command-line overrides of single-valued parameters pinned to the config.

  A single value in the YAML records one of the reference's fixed settings (num_epochs 50);
  `--config.num_epochs=5` on the command line means the user wants 5. Overriding a searched
  parameter is contradictory and raises SweepError.
  """
  spec = _plain(spec)
  for name in overrides:
    p = spec['parameters'].get(name)
    if p is None:
      continue
    if _is_searched(p):
      raise SweepError(f'--config.{name} is set on the command line but the sweep searches '
                       f'{name} ({p}); drop one of the two')
    spec['parameters'][name] = {'value': _plain(config[name])}
    print(f'sweep: {name} fixed to {config[name]!r} by --config.{name} (the sweep config says {p})')
  return spec


def check_space(spec: Mapping[str, Any], config: ml_collections.ConfigDict,
                limit: int = 5000) -> tuple[int, int, str]:
  """(combinations, rejected, first error) of the spec's values under cnn.config.validate.

  Categorical parameters are enumerated and continuous ones tried at both ends, so a sweep
  that would draw e.g. kernel 7 on too small an image is announced before anything trains.
  """
  choices = {name: _choices(p) for name, p in spec['parameters'].items()}
  rejected, first = 0, ''
  for values in itertools.islice(itertools.product(*choices.values()), limit):
    params = dict(zip(choices, values))
    try:
      config_lib.validate(apply_sweep_params(config, params))
    except config_lib.ConfigError as e:  # SweepError included
      rejected += 1
      first = first or f'{params}: {e}'
  return min(math.prod(len(c) for c in choices.values()), limit), rejected, first


# ---------------------------------------------------------------------------- reading a sweep


def _history(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in rows]


def engine_runs(workdir: str, exclude: str = '') -> list:
  """The sweep's runs as `sweeps.SweepRun`s, with history, as W&B's controller sees them.

  pydantic 2 drops `history=`/`summary_metrics=` given by field name: they go by alias.
  Runs stopped by hyperband count as finished (their metrics are real; W&B marks a run that
  exits cleanly after the stop the same way); runs drawn but not ended count as running.
  """
  import sweeps
  states = {None: sweeps.RunState.running, 'finished': sweeps.RunState.finished,
            'stopped': sweeps.RunState.finished, 'failed': sweeps.RunState.failed}
  ended = {r['run']: r['state'] for r in sweep_files.read_results(workdir)}
  runs = []
  for claim in sweep_files.read_claims(workdir):
    name = claim['run']
    if name == exclude:
      continue
    history = _history(sweep_files.read_metrics(sweep_files.run_dir(workdir, name)))
    runs.append(sweeps.SweepRun(
        name=name, state=states[ended.get(name)],
        config={k: {'value': v} for k, v in claim['params'].items()},
        sampledHistory=history, summaryMetrics=history[-1] if history else {}))
  return runs


# ---------------------------------------------------------------------------- the offline loop


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _seeded(*entropy: int) -> Iterator[None]:
  """Seeds the engine's global RNGs (random, np.random) and restores them afterwards."""
  # Hashed through SeedSequence: MT19937 seeded with nearby integers gives correlated draws.
  seed = int(np.random.SeedSequence([e % 2**32 for e in entropy]).generate_state(1)[0])
  py_state, np_state = random.getstate(), np.random.get_state()
  random.seed(seed)
  np.random.seed(seed)
  try:
    yield
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)


@contextlib.contextmanager
def _wandb_group(group: str, wandb_mode: str) -> Iterator[None]:
  """The W&B runs started meanwhile go to `group`, with job type 'sweep'.

  The metrics writer starts each run, so the group goes into the settings of wandb's session
  (wandb.setup), which every wandb.init starts from. wandb.setup cannot unset a setting:
  wandb.teardown afterwards ends the session, and the next one starts from the environment.
  """
  if wandb_mode == 'disabled':
    yield
    return
  import wandb
  wandb.setup(wandb.Settings(run_group=group, run_job_type='sweep'))
  try:
    yield
  finally:
    wandb.teardown()


def propose(spec: Mapping[str, Any], runs: list, seed: int, index: int) -> dict | None:
  """The engine's values for run `index` (None when a grid is exhausted), seeded so a sweep
  draws the same runs however often it is interrupted; random/bayes redraw repeats."""
  import sweeps
  seen = [{k: v['value'] for k, v in r.config.items()} for r in runs]
  params = None
  for attempt in range(_MAX_DRAWS):
    with _seeded(seed, index, attempt):
      suggestion = sweeps.next_run(dict(spec), runs)
    if suggestion is None:
      return None
    params = _plain({k: v['value'] for k, v in suggestion.config.items()})
    if params not in seen:
      return params
  return params  # the space is exhausted: repeat rather than stop


def _hyperband_callback(spec: Mapping[str, Any], workdir: str, name: str, stop_info: dict
                        ) -> Callable[[int, dict], bool]:
  """An epoch_callback that asks the engine's hyperband whether this run should stop.

  As W&B's controller does, it passes every run of the sweep with its history; this run's
  history is its metrics.jsonl (epochs before this one) plus this epoch's metrics.
  """
  import sweeps
  metric = spec['metric']['name']
  run_dir = sweep_files.run_dir(workdir, name)

  def callback(epoch: int, metrics: dict) -> bool:
    if metric not in metrics:
      raise SweepError(f'the sweep metric {metric!r} is not among the logged metrics '
                       f'{sorted(metrics)}; set metric.name in the sweep config to one of them')
    rows = [r for r in sweep_files.read_metrics(run_dir) if r['epoch'] < epoch]
    me = sweeps.SweepRun(name=name, state=sweeps.RunState.running,
                         sampledHistory=_history(rows + [{'epoch': epoch, **metrics}]))
    to_stop = sweeps.stop_runs(dict(spec), engine_runs(workdir, exclude=name) + [me])
    if not any(r.name == name for r in to_stop):
      return False
    # The band that decided: the last one this run's history has passed (W&B's rule).
    info = me.early_terminate_info or {}
    history = me.metric_history(metric, filter_invalid=True)
    band, threshold = [(b, t) for b, t in zip(info['bands'], info['thresholds'])
                       if b < len(history)][-1]
    sign = -1.0 if spec['metric']['goal'] == 'maximize' else 1.0  # the engine minimises
    best = max(history) if sign < 0 else min(history)
    stop_info.update(epoch=epoch, band=band, threshold=sign * float(threshold), best=best,
                     metric=metric)
    print(f'sweep: hyperband stops {name} after epoch {epoch}: its best {metric} {best:.4f} '
          f'is below the threshold {sign * threshold:.4f} of band {band}', flush=True)
    return True

  return callback


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _write_json(path: str, data: Any) -> None:
  """Atomically: other workers read these files without the lock."""
  atomic.atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + '\n'))


def _run_one(base: ml_collections.ConfigDict, spec: Mapping[str, Any], workdir: str,
             claim: dict, train_fn: TrainFn) -> dict:
  """Trains one drawn run and returns its result record; errors become a failed record."""
  name, run_dir = claim['run'], sweep_files.run_dir(workdir, claim['run'])
  record = {'run': name, 'index': claim['index'], 'params': claim['params'],
            'workdir': os.path.relpath(run_dir, workdir), 'created': claim['created'],
            'config': None, 'state': 'failed', 'error': None, 'best_val_acc': None,
            'final_val_acc': None, 'best_epoch': None, 'epochs': 0, 'num_params': None,
            'hyperband': None}
  t0 = time.time()
  stop_info: dict = {}
  try:
    config = apply_sweep_params(base, claim['params'])
    config.run_name = name
    config.cache_dir = base.cache_dir  # one shared cache, whatever the sweep says
    record['config'] = _plain(config.to_dict())
    config_lib.validate(config)
    callback = (_hyperband_callback(spec, workdir, name, stop_info)
                if 'early_terminate' in spec else None)
    summary = train_fn(config, run_dir, epoch_callback=callback)
    record['state'] = 'stopped' if stop_info else 'finished'
    record['num_params'] = summary.get('num_params')
    record['wall_time_s'] = summary.get('wall_time_s', time.time() - t0)
  except Exception as e:  # noqa: BLE001
    # Any error ends this run only: the sweep goes on, and bayes learns the region is bad.
    record['error'] = f'{type(e).__name__}: {e}'
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'error.txt'), 'w') as f:
      f.write(traceback.format_exc())
    print(f'sweep: run {name} failed: {record["error"]}', flush=True)
    _finish_wandb_run()
  record.setdefault('wall_time_s', time.time() - t0)
  rows = sweep_files.read_metrics(run_dir)
  accs = [r['val_acc'] for r in rows if isinstance(r.get('val_acc'), (int, float))]
  if accs:
    best = int(np.argmax(accs))
    record.update(best_val_acc=accs[best], final_val_acc=accs[-1],
                  best_epoch=rows[best]['epoch'], epochs=len(accs))
  record['hyperband'] = stop_info or None
  record['ended'] = _now()
  return record


def _finish_wandb_run() -> None:
  """Closes a W&B run left open by a crash: wandb.init would hand it to the next run."""
  wandb = sys.modules.get('wandb')
  if wandb is not None and getattr(wandb, 'run', None) is not None:
    try:
      wandb.finish(exit_code=1)
    except Exception:  # noqa: BLE001
      logging.exception('could not finish the W&B run of a failed sweep run')


def _check_spec_file(workdir: str, spec: dict, base: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/sweep.json, or refuses a rerun whose spec or base config differ."""
  base_d = _plain(base.to_dict())
  old = sweep_files.read_spec(workdir)
  if old is None:
    _write_json(os.path.join(workdir, sweep_files.SPEC_FILE),
                {'spec': spec, 'base_config': base_d, 'created': _now()})
    return
  diffs = [f'sweep spec {old["spec"]} -> {spec}'] if old['spec'] != spec else []
  base_diff = config_lib.config_diff(config_lib.run_fields(old['base_config']),
                                     config_lib.run_fields(base_d))
  diffs += [base_diff] if base_diff else []
  if diffs:
    raise SweepError(f'{workdir} holds a sweep started with other settings ({"; ".join(diffs)}).'
                     f' Continue it with the same command, or use another --workdir')


def _next_claim(workdir: str, spec: dict, base: ml_collections.ConfigDict, sweep_count: int,
                stack: contextlib.ExitStack) -> dict | None:
  """Under the sweep lock: an interrupted run to resume, else a newly drawn one, else None.

  The chosen run's lock is entered on `stack` so other workers see it as running.
  """
  with _locked(os.path.join(workdir, sweep_files.SWEEP_LOCK)):
    ended = {r['run'] for r in sweep_files.read_results(workdir)}
    claims = sweep_files.read_claims(workdir)
    for claim in claims:
      run_lock = os.path.join(sweep_files.run_dir(workdir, claim['run']), sweep_files.RUN_LOCK)
      if claim['run'] not in ended and stack.enter_context(_locked(run_lock, blocking=False)):
        print(f'sweep: resuming interrupted run {claim["run"]}')
        return claim
    if len(claims) >= sweep_count:
      return None
    index = len(claims)
    params = propose(spec, engine_runs(workdir), base.seed, index)
    if params is None:
      print(f'sweep: the grid is exhausted after {index} runs')
      return None
    extra = [k for k, p in spec['parameters'].items()
             if _is_searched(p) and k not in dict(config_lib.NAME_FIELDS).values()]
    run_config = apply_sweep_params(base, params)
    name = config_lib.hyperparameter_name(run_config, extra)
    if os.path.exists(sweep_files.run_dir(workdir, name)):
      name += f'_{index + 1}'  # values drawn again once the space is exhausted
    claim = {'run': name, 'index': index, 'params': params, 'created': _now()}
    run_dir = sweep_files.run_dir(workdir, name)
    os.makedirs(run_dir)
    stack.enter_context(_locked(os.path.join(run_dir, sweep_files.RUN_LOCK)))
    _write_json(os.path.join(run_dir, sweep_files.RUN_FILE), claim)
    return claim


def _run_header(claim: dict, sweep_count: int, ended: list[dict]) -> str:
  """`sweep: run 3/20: NAME (2 ended, 10.5 min a run)`: where the whole sweep stands.

  No ETA: other workers (`--mode=sweep` on other machines) share the count.
  """
  line = f'sweep: run {claim["index"] + 1}/{sweep_count}: {claim["run"]}'
  walls = [r['wall_time_s'] for r in ended if isinstance(r.get('wall_time_s'), (int, float))]
  if walls:
    line += f' ({len(ended)} ended, {sum(walls) / len(walls) / 60:.1f} min a run)'
  return line


def _append_result(workdir: str, record: dict) -> None:
  # Appended, not rewritten: a line cut short by a kill is skipped by read_results.
  with _locked(os.path.join(workdir, sweep_files.SWEEP_LOCK)):
    with open(os.path.join(workdir, sweep_files.RESULTS_FILE), 'a') as f:
      f.write(json.dumps(_plain(record)) + '\n')


def _prepare(config: ml_collections.ConfigDict, workdir: str, spec: dict
             ) -> ml_collections.ConfigDict:
  """The base config of every run; checks the workdir's sweep.json and the value space."""
  base = config.copy_and_resolve_references()
  if base.cache_dir:
    base.cache_dir = os.path.abspath(base.cache_dir)
  if base.wandb_mode == '':
    base.wandb_mode = 'offline'  # no W&B server assumed: `wandb sync` uploads the runs later
  os.makedirs(os.path.join(workdir, sweep_files.RUNS_DIR), exist_ok=True)
  with _locked(os.path.join(workdir, sweep_files.SWEEP_LOCK)):
    _check_spec_file(workdir, spec, base)
  total, rejected, first = check_space(spec, base)
  if rejected:
    print(f'sweep: warning: {rejected} of {total} value combinations are rejected by the config '
          f'check and will be recorded as failed, e.g. {first}')
  return base


# PLR0913: the sweep's inputs, all but the first two by keyword.
def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, sweep_config_path: str,  # noqa: PLR0913
              sweep_count: int, overrides: Sequence[str] = (), train_fn: TrainFn | None = None,
              report: bool = True) -> list[dict]:
  """Runs the sweep of `sweep_config_path` offline in `workdir` until it holds `sweep_count`
  runs (a grid also ends when exhausted); returns all result records, best first.

  `overrides`: the config fields set on the command line, which win over the YAML's
  single-valued parameters. `train_fn` defaults to cnn.runs.train_and_evaluate.
  """
  if train_fn is None:
    from cnn import runs
    train_fn = runs.train_and_evaluate
  spec = load_sweep_config(sweep_config_path)
  check_parameters(spec, config)
  spec = pin_overrides(spec, config, overrides)
  if sweep_count <= 0:
    raise SweepError(f'--sweep_count={sweep_count}: give the number of runs the sweep should '
                     f'hold in total, e.g. --sweep_count=20')
  base = _prepare(config, workdir, spec)
  with _wandb_group(spec.get('name') or os.path.basename(os.path.abspath(workdir)),
                    base.wandb_mode):
    while True:
      with contextlib.ExitStack() as stack:
        claim = _next_claim(workdir, spec, base, sweep_count, stack)
        if claim is None:
          break
        print(_run_header(claim, sweep_count, sweep_files.read_results(workdir)), flush=True)
        record = _run_one(base, spec, workdir, claim, train_fn)
        _append_result(workdir, record)
      acc = record['best_val_acc']
      print(f'sweep: {record["run"]}: {record["state"]}'
            + (f', best val_acc {acc:.4f} at epoch {record["best_epoch"]}' if acc is not None
               else ''), flush=True)
  results = sweep_files.read_results(workdir)
  done = sum(r['state'] != 'failed' for r in results)
  print(f'sweep: {len(results)} runs in {workdir} ({done} trained, {len(results) - done} failed)')
  if report:
    from cnn import sweep_report  # matplotlib and sklearn only when a report is wanted
    sweep_report.write_report(workdir)
  return sorted(results, key=lambda r: -(r['best_val_acc'] if r['best_val_acc'] is not None
                                         else -1.0))
