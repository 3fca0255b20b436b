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
import os
import random
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import yaml

from cnn import config as config_lib
from cnn import sweep_files

# Redraws when random or bayes proposes values already run: a rerun of identical values with
# the same seed would only repeat a result.
_MAX_DRAWS = 50

TrainFn = Callable[..., dict]

SweepError = sweep_files.SweepError


# ---------------------------------------------------------------------------- names and values


def _to_python(value: Any) -> Any:
  """numpy scalars (the engine's samples) -> Python values that JSON and ConfigDict accept."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  return value


def _to_bool(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.lower() in ('true', 'false'):
    return value.lower() == 'true'
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  raise ValueError


def _to_int(value: Any) -> int:
  # bool is an int subclass, but True for kernel_size is a mistake, not a 1.
  if isinstance(value, bool):
    raise ValueError
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str):
    return int(value)
  raise ValueError


def _to_float(value: Any) -> float:
  if isinstance(value, bool):
    raise ValueError
  if isinstance(value, (int, float, str)):
    return float(value)
  raise ValueError


def _to_str(value: Any) -> str:
  if isinstance(value, str):
    return value
  raise ValueError


def _to_tuple(value: Any) -> tuple:
  if isinstance(value, (list, tuple)):
    return tuple(value)
  raise ValueError


# Field type -> converter that raises ValueError for a value that does not fit. bool comes
# before int because isinstance(True, int).
_CONVERTERS = ((bool, _to_bool), (int, _to_int), (float, _to_float), (str, _to_str),
               (tuple, _to_tuple))


def _coerce(name: str, value: Any, current: Any) -> Any:
  """`value` converted to the type of the config field's `current` value, or SweepError."""
  value = _to_python(value)
  for field_type, convert in _CONVERTERS:
    if isinstance(current, field_type):
      try:
        return convert(value)
      except ValueError:
        raise SweepError(
            f'sweep parameter {name}={value!r} ({type(value).__name__}) does not fit the '
            f'config field {name}, which holds a {type(current).__name__} '
            f'(now {current!r})') from None
  return value


def apply_sweep_params(config: ml_collections.ConfigDict,
                       params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the sweep's values, each converted to its field's type.

  Raises SweepError naming unknown keys (with the closest field names) or values that do not
  fit their field (e.g. 0.5 for kernel_size); 1 becomes 1.0 for a float field like filter_org.
  """
  unknown = [k for k in params if k not in config]
  if unknown:
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, list(config.keys()), n=1)
      hints.append(f'{k!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
    raise SweepError(f'sweep parameters {", ".join(hints)} are not config fields; the names '
                     f'must be fields of configs/default.py')
  new = config.copy_and_resolve_references()
  for key, value in params.items():
    current = new[key]
    if isinstance(current, ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise SweepError(f'sweep parameter {key} must be a mapping of its sub-fields')
      new[key] = apply_sweep_params(current, value)
    else:
      new[key] = _coerce(key, value, current)
  return new


# ---------------------------------------------------------------------------- `wandb agent`


def load_agent_params(path: str) -> dict[str, Any]:
  """The values of one agent run, from the file `wandb agent` writes.

  `${args_json_file}` (wandb/sweep-ID/config-RUN.json): a JSON object {parameter: value}, as
  wandb.sdk.launch.sweeps.utils.create_sweep_command_args dumps it. The agent's YAML twin
  (config-RUN.yaml, $WANDB_SWEEP_PARAM_PATH: `wandb_version: 1` and {parameter: {value: v}})
  is read too.
  """
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise SweepError(f'cannot read sweep parameter file {path}: {e}') from None
  if path.endswith(('.yaml', '.yml')):
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
      raise SweepError(f'{path}: expected a mapping of parameters, got {type(data).__name__}')
    data.pop('wandb_version', None)
    params = {}
    for key, entry in data.items():
      if not isinstance(entry, dict) or 'value' not in entry:
        raise SweepError(f'{path}: parameter {key!r} has no "value" entry')
      params[key] = entry['value']
    return params
  try:
    params = json.loads(text)
  except json.JSONDecodeError as e:
    raise SweepError(f'{path} is not the JSON object `wandb agent` writes for '
                     f'${{args_json_file}}: {e}') from None
  if not isinstance(params, dict):
    raise SweepError(f'{path}: expected a JSON object {{parameter: value}}, got '
                     f'{type(params).__name__}')
  return params


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


def command_line_overrides(argv: Sequence[str]) -> tuple[str, ...]:
  """Names of the config fields set by `--config.FIELD=...` (or `--config.FIELD VALUE`)."""
  names = []
  for arg in argv:
    if arg.startswith(('--config.', '-config.')):
      field = arg.split('config.', 1)[1].split('=', 1)[0].split('.', 1)[0]
      if field and field not in names:
        names.append(field)
  return tuple(names)


# ---------------------------------------------------------------------------- sweep specs


def load_sweep_config(path: str) -> dict:
  """The YAML's sweep spec, validated by the `sweeps` engine (the schema W&B's server uses)."""
  import jsonschema
  import sweeps
  try:
    with open(path) as f:
      spec = yaml.safe_load(f)
  except OSError as e:
    raise SweepError(f'cannot read sweep config {path}: {e}') from None
  except yaml.YAMLError as e:
    raise SweepError(f'{path} is not valid YAML: {e}') from None
  if not isinstance(spec, dict):
    raise SweepError(f'{path}: a sweep config is a YAML mapping (method, metric, parameters)')
  try:
    return dict(sweeps.SweepConfig(spec))
  except (jsonschema.ValidationError, ValueError) as e:
    message = getattr(e, 'message', str(e))
    raise SweepError(f'{path} is not a valid W&B sweep config: {message}') from None


def _is_searched(spec: Mapping[str, Any]) -> bool:
  return 'value' not in spec and not ('values' in spec and len(spec['values']) == 1)


def check_parameters(spec: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
  """SweepError unless every parameter is a config field that may vary between runs."""
  params = spec['parameters']
  if 'early_terminate' in spec and 'metric' not in spec:
    raise SweepError('early_terminate needs a metric section (e.g. name: val_acc, goal: maximize)')
  bad = sorted(set(params) & config_lib.UNSWEEPABLE_FIELDS)
  if bad:
    raise SweepError(f'{", ".join(bad)} cannot be swept: every run of a sweep shares them '
                     f'(one decoded-image cache, one W&B project); set them with --config.FIELD')
  # Checks names and types on one representative value of each parameter.
  sample = {}
  for name, p in params.items():
    if 'value' in p:
      sample[name] = p['value']
    elif 'values' in p:
      sample[name] = p['values'][0]
    elif 'min' in p:
      sample[name] = p['min']
  apply_sweep_params(config, sample)
  for name, p in params.items():
    for v in p.get('values', ()):
      _coerce(name, v, config[name])


def pin_overrides(spec: Mapping[str, Any], config: ml_collections.ConfigDict,
                  overrides: Sequence[str]) -> dict:
  """The spec with command-line overrides of single-valued parameters pinned to the config.

  A single value in the YAML records one of the reference's fixed settings (num_epochs 50);
  `--config.num_epochs=5` on the command line means the user wants 5. Overriding a searched
  parameter is contradictory and raises SweepError.
  """
  spec = json.loads(json.dumps(spec, default=_to_python))
  for name in overrides:
    p = spec['parameters'].get(name)
    if p is None:
      continue
    if _is_searched(p):
      raise SweepError(f'--config.{name} is set on the command line but the sweep searches '
                       f'{name} ({_describe(p)}); drop one of the two')
    value = config[name]
    spec['parameters'][name] = {'value': list(value) if isinstance(value, tuple) else value}
    print(f'sweep: {name} fixed to {value!r} by --config.{name} (the sweep config says '
          f'{_describe(p)})')
  return spec


def _describe(p: Mapping[str, Any]) -> str:
  if 'values' in p:
    return f'values {p["values"]}'
  if 'value' in p:
    return f'value {p["value"]!r}'
  return ', '.join(f'{k} {v}' for k, v in p.items())


def check_space(spec: Mapping[str, Any], config: ml_collections.ConfigDict,
                limit: int = 5000) -> tuple[int, int, str]:
  """(combinations, rejected, first error) of the spec's values under cnn.config.validate.

  Categorical parameters are enumerated and continuous ones tried at both ends, so a sweep
  that would draw e.g. kernel 7 on too small an image is announced before anything trains.
  """
  names, choices = [], []
  for name, p in spec['parameters'].items():
    names.append(name)
    if 'value' in p:
      choices.append([p['value']])
    elif 'values' in p:
      choices.append(list(p['values']))
    else:
      choices.append([p['min'], p['max']])
  total = int(np.prod([len(c) for c in choices])) if choices else 1
  combos = itertools.product(*choices)
  rejected, first = 0, ''
  for values in itertools.islice(combos, limit):
    try:
      config_lib.validate(apply_sweep_params(config, dict(zip(names, values))))
    except config_lib.ConfigError as e:  # SweepError included
      rejected += 1
      if not first:
        first = f'{dict(zip(names, values))}: {e}'
  return min(total, limit), rejected, first


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
  ended = {r['run']: r for r in sweep_files.read_results(workdir)}
  runs = []
  for claim in sweep_files.read_claims(workdir):
    name = claim['run']
    if name == exclude:
      continue
    record = ended.get(name)
    state = {None: sweeps.RunState.running, 'finished': sweeps.RunState.finished,
             'stopped': sweeps.RunState.finished,
             'failed': sweeps.RunState.failed}[record and record['state']]
    history = _history(sweep_files.read_metrics(sweep_files.run_dir(workdir, name)))
    runs.append(sweeps.SweepRun(
        name=name, state=state,
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

  Set on wandb's session, not through $WANDB_RUN_GROUP: wandb reads its environment once, when
  the session starts, so a variable set after any earlier run of this process was ignored,
  and one read by the sweep's first run stayed on every later run of the process.
  """
  if wandb_mode == 'disabled':
    yield
    return
  import wandb
  session = wandb.setup().settings  # what every wandb.init of this process starts from
  old = {'run_group': session.run_group, 'run_job_type': session.run_job_type}
  # Assigned, not passed to wandb.setup(settings=...): that skips None, so could not restore.
  session.run_group, session.run_job_type = group, 'sweep'
  try:
    yield
  finally:
    for key, value in old.items():
      setattr(session, key, value)


def _key(params: Mapping[str, Any]) -> str:
  return json.dumps(params, sort_keys=True)


def propose(spec: Mapping[str, Any], runs: list, seed: int, index: int) -> dict | None:
  """The engine's values for run `index` (None when a grid is exhausted), seeded so a sweep
  draws the same runs however often it is interrupted; random/bayes redraw repeats."""
  import sweeps
  seen = {_key({k: v['value'] for k, v in r.config.items()}) for r in runs}
  params = None
  for attempt in range(_MAX_DRAWS):
    with _seeded(seed, index, attempt):
      suggestion = sweeps.next_run(dict(spec), runs)
    if suggestion is None:
      return None
    params = _to_python({k: v['value'] for k, v in suggestion.config.items()})
    if _key(params) not in seen:
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
    rows = [r for r in sweep_files.read_metrics(run_dir) if r.get('epoch', 0) < epoch]
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
    record['config'] = json.loads(json.dumps(config.to_dict(), default=str))
    config_lib.validate(config)
    callback = (_hyperband_callback(spec, workdir, name, stop_info)
                if 'early_terminate' in spec else None)
    summary = train_fn(config, run_dir, epoch_callback=callback)
    record['state'] = 'stopped' if stop_info else 'finished'
    record['num_params'] = summary.get('num_params')
    record['wall_time_s'] = summary.get('wall_time_s', time.time() - t0)
  except Exception as e:  # pylint: disable=broad-except
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
                  best_epoch=rows[best].get('epoch', best + 1), epochs=len(accs))
  record['hyperband'] = stop_info or None
  record['ended'] = _now()
  return record


def _finish_wandb_run() -> None:
  """Closes a W&B run left open by a crash, so the next run gets a run of its own."""
  wandb = sys.modules.get('wandb')
  if wandb is not None and getattr(wandb, 'run', None) is not None:
    try:
      wandb.finish(exit_code=1)
    except Exception:  # pylint: disable=broad-except
      logging.exception('could not finish the W&B run of a failed sweep run')


def _check_spec_file(workdir: str, spec: dict, base: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/sweep.json, or refuses a rerun whose spec or base config differ."""
  from cnn import checkpoints  # jax and orbax: not for the `wandb agent` path's agent_config
  base_d = json.loads(json.dumps(base.to_dict(), default=str))
  old = sweep_files.read_spec(workdir)
  if old is None:
    checkpoints.write_json(sweep_files.spec_path(workdir),
                           {'spec': spec, 'base_config': base_d, 'created': _now()})
    return
  diffs = [f'sweep spec {old["spec"]} -> {spec}'] if old['spec'] != spec else []
  base_diff = config_lib.config_diff(config_lib.run_fields(old['base_config']),
                                     config_lib.run_fields(base_d))
  diffs += [base_diff] if base_diff else []
  if diffs:
    raise SweepError(f'{workdir} holds a sweep started with other settings ({"; ".join(diffs)}).'
                     f' Continue it with the same command, or use another --workdir')


def _unique_name(workdir: str, name: str) -> str:
  candidate, n = name, 1
  while os.path.exists(sweep_files.run_dir(workdir, candidate)):
    n += 1
    candidate = f'{name}_{n}'
  return candidate


def _next_claim(workdir: str, spec: dict, base: ml_collections.ConfigDict, sweep_count: int,
                stack: contextlib.ExitStack) -> dict | None:
  """Under the sweep lock: an interrupted run to resume, else a newly drawn one, else None.

  The chosen run's lock is entered on `stack` so other workers see it as running.
  """
  from cnn import checkpoints
  with _locked(sweep_files.sweep_lock_path(workdir)):
    ended = {r['run'] for r in sweep_files.read_results(workdir)}
    claims = sweep_files.read_claims(workdir)
    for claim in claims:
      if claim['run'] in ended:
        continue
      lock = sweep_files.run_lock_path(workdir, claim['run'])
      if stack.enter_context(_locked(lock, blocking=False)):
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
    name = _unique_name(workdir, config_lib.hyperparameter_name(run_config, extra))
    claim = {'run': name, 'index': index, 'params': params, 'created': _now()}
    os.makedirs(sweep_files.run_dir(workdir, name))
    stack.enter_context(_locked(sweep_files.run_lock_path(workdir, name)))
    checkpoints.write_json(sweep_files.run_file_path(workdir, name), claim)
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
  with _locked(sweep_files.sweep_lock_path(workdir)):
    with open(sweep_files.results_path(workdir), 'a') as f:
      f.write(json.dumps(_to_python(record), default=str) + '\n')


# PLR0913: public call fixed by main.py and tests/test_sweep.py (five keyword arguments).
def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, sweep_config_path: str,  # noqa: PLR0913
              sweep_count: int, overrides: Sequence[str] | None = None,
              train_fn: TrainFn | None = None, report: bool = True) -> list[dict]:
  """Runs the sweep of `sweep_config_path` offline in `workdir` until it holds `sweep_count`
  runs (a grid also ends when exhausted); returns all result records, best first.

  `overrides`: config fields set on the command line (default: parsed from sys.argv), which
  win over the YAML's single-valued parameters. `train_fn` defaults to
  cnn.train.train_and_evaluate.
  """
  if train_fn is None:
    from cnn import train
    train_fn = train.train_and_evaluate
  if overrides is None:
    overrides = command_line_overrides(sys.argv)
  spec = load_sweep_config(sweep_config_path)
  check_parameters(spec, config)
  spec = pin_overrides(spec, config, overrides)
  if sweep_count <= 0:
    raise SweepError(f'--sweep_count={sweep_count}: give the number of runs the sweep should '
                     f'hold in total, e.g. --sweep_count=20')

  base = config.copy_and_resolve_references()
  if base.cache_dir:
    base.cache_dir = os.path.abspath(base.cache_dir)
  if base.wandb_mode == '':
    base.wandb_mode = 'offline'  # no W&B server assumed: `wandb sync` uploads the runs later
  os.makedirs(os.path.join(workdir, sweep_files.RUNS_DIR), exist_ok=True)
  with _locked(sweep_files.sweep_lock_path(workdir)):
    _check_spec_file(workdir, spec, base)

  total, rejected, first = check_space(spec, base)
  if rejected:
    print(f'sweep: warning: {rejected} of {total} value combinations are rejected by the config '
          f'check and will be recorded as failed, e.g. {first}')
  group = spec.get('name') or os.path.basename(os.path.abspath(workdir))
  with _wandb_group(group, base.wandb_mode):
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

