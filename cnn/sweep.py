"""Hyperparameter sweeps: the `wandb agent` path, and the same sweeps offline on W&B's engine.

Under `wandb agent`, W&B's sweep controller picks each run's values and main.py applies them
(`agent_config`). Offline, `run_sweep` draws runs from the same YAML with the `sweeps`
package that W&B's controller runs (random, grid, bayes, hyperband), one run after another.
Several `run_sweep` processes may share one WORKDIR (file locks): together they draw
`sweep_count` runs. A run interrupted mid-training is resumed by the next invocation.

    WORKDIR/sweep.json             the effective sweep spec and base config (reruns must match)
    WORKDIR/sweep_results.jsonl    one line per ended run: params, config, val_acc, state, ...
    WORKDIR/runs/<run name>/       the run's workdir, plus sweep_run.json written at draw time
    WORKDIR/report/                plots and summary.md (cnn.sweep_report, which reads these
                                   files through this module without the engine)
"""

import contextlib
import datetime
import difflib
import fcntl
import itertools
import json
import math
import os
import random
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import yaml

from cnn import atomic
from cnn import config as config_lib

RESULTS_FILE = 'sweep_results.jsonl'
SPEC_FILE = 'sweep.json'
RUNS_DIR = 'runs'
RUN_FILE = 'sweep_run.json'  # in each run's folder: the drawn values
REPORT_DIR = 'report'
RUN_LOCK = '.sweep_run.lock'  # in each run's folder, held while it trains: free = interrupted
SWEEP_LOCK = '.sweep.lock'  # held while a worker reads or changes what is drawn and ended
# Redraws when random or bayes proposes values already run: a rerun of identical values with
# the same seed would only repeat a result.
_MAX_DRAWS = 50

TrainFn = Callable[..., dict]


class SweepError(config_lib.ConfigError):
  """A sweep spec, sweep values or sweep workdir that cannot work; the message says what to do."""


# ---------------------------------------------------------------------------- the sweep's files


def run_dir(workdir: str, name: str) -> str:
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
  """The ended runs, by draw index."""
  return _read_jsonl(os.path.join(workdir, RESULTS_FILE), lambda r: r['index'])


def read_metrics(run_dir_path: str) -> list[dict]:
  """The epochs of a run's metrics.jsonl, one per epoch, in order."""
  return _read_jsonl(os.path.join(run_dir_path, 'metrics.jsonl'), lambda r: r['epoch'])


def read_claims(workdir: str) -> list[dict]:
  """Every drawn run's sweep_run.json (ended or not), by draw index."""
  root = os.path.join(workdir, RUNS_DIR)
  names = os.listdir(root) if os.path.isdir(root) else []
  claims = [_read_json(os.path.join(run_dir(workdir, name), RUN_FILE)) for name in names]
  return sorted((c for c in claims if c is not None), key=lambda c: c['index'])


# ---------------------------------------------------------------------------- names and values


def _plain(value: Any) -> Any:
  """`value` as JSON gives it back: numpy scalars (the engine's samples) become Python values."""
  return json.loads(json.dumps(value, default=lambda v: v.item()))


def apply_sweep_params(config: ml_collections.ConfigDict,
                       params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the sweep's values; ConfigDict's typed assignment checks each
  (and turns 1 into 1.0 for a float field, a list into a tuple for a tuple field)."""
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
  """The values of one agent run: `${args_json_file}` is a JSON {parameter: value};
  $WANDB_SWEEP_PARAM_PATH is W&B's config YAML, `wandb_version: 1` and {parameter: {value: v}}."""
  try:
    with open(path) as f:
      params = yaml.safe_load(f)  # JSON is YAML
  except (OSError, yaml.YAMLError) as e:
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

  $WANDB_SWEEP_PARAM_PATH is the fallback: the agent sets it whatever the YAML's command.
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
  try:
    return dict(sweeps.SweepConfig(spec))
  except (jsonschema.ValidationError, ValueError) as e:  # ValueError: not a mapping
    message = getattr(e, 'message', str(e))
    raise SweepError(f'{path} is not a valid W&B sweep config: {message}') from None


def searched_parameters(spec: Mapping[str, Any]) -> dict[str, dict]:
  """{name: parameter spec} of the parameters that vary between runs."""
  return {name: p for name, p in spec['parameters'].items()
          if 'value' not in p and len(p.get('values', ())) != 1}


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
  """The spec with single-valued parameters set on the command line pinned to the config:
  `--config.num_epochs=5` beats the YAML's fixed 50. A searched one is a contradiction."""
  spec = _plain(spec)
  for name in overrides:
    p = spec['parameters'].get(name)
    if p is None:
      continue
    if name in searched_parameters(spec):
      raise SweepError(f'--config.{name} is set on the command line but the sweep searches '
                       f'{name} ({p}); drop one of the two')
    spec['parameters'][name] = {'value': _plain(config[name])}
    print(f'sweep: {name} fixed to {config[name]!r} by --config.{name} (the sweep config says {p})')
  return spec


def check_space(spec: Mapping[str, Any], config: ml_collections.ConfigDict,
                limit: int = 5000) -> tuple[int, int, str]:
  """(combinations, rejected, first error) of the spec's values (a range: both ends) under
  cnn.config.validate: e.g. kernel 7 on too small an image is announced before anything trains."""
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
  """The sweep's runs as `sweeps.SweepRun`s, with history, as W&B's controller sees them:
  stopped by hyperband counts as finished (as W&B marks a run that exits cleanly after the stop),
  drawn but not ended as running. pydantic 2 drops history given by field name: it goes by alias.
  """
  import sweeps
  states = {None: sweeps.RunState.running, 'finished': sweeps.RunState.finished,
            'stopped': sweeps.RunState.finished, 'failed': sweeps.RunState.failed}
  ended = {r['run']: r['state'] for r in read_results(workdir)}
  runs = []
  for claim in read_claims(workdir):
    name = claim['run']
    if name == exclude:
      continue
    history = _history(read_metrics(run_dir(workdir, name)))
    runs.append(sweeps.SweepRun(
        name=name, state=states[ended.get(name)],
        config={k: {'value': v} for k, v in claim['params'].items()},
        sampledHistory=history, summaryMetrics=history[-1] if history else {}))
  return runs


# ---------------------------------------------------------------------------- the offline loop


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
  """An flock on `path`, released when the file closes; False when taken (non-blocking)."""
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    yield True


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
  """The W&B runs started meanwhile go to `group`, with job type 'sweep': set in wandb's session
  (wandb.setup), which every wandb.init starts from; wandb.teardown ends the session, since
  wandb.setup cannot unset a setting."""
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
  """An epoch_callback that asks the engine's hyperband, given every run's history as W&B's
  controller does, whether this run should stop; it records the decision in `stop_info`."""
  import sweeps
  metric = spec['metric']['name']
  folder = run_dir(workdir, name)

  def callback(epoch: int, metrics: dict) -> bool:
    if metric not in metrics:
      raise SweepError(f'the sweep metric {metric!r} is not among the logged metrics '
                       f'{sorted(metrics)}; set metric.name in the sweep config to one of them')
    rows = [r for r in read_metrics(folder) if r['epoch'] < epoch]
    me = sweeps.SweepRun(name=name, state=sweeps.RunState.running,
                         sampledHistory=_history(rows + [{'epoch': epoch, **metrics}]))
    to_stop = sweeps.stop_runs(dict(spec), engine_runs(workdir, exclude=name) + [me])
    if not any(r.name == name for r in to_stop):
      return False
    # The band that decided: the last one this run's history has passed (W&B's rule).
    info = me.early_terminate_info
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
  name, folder = claim['run'], run_dir(workdir, claim['run'])
  record = {'run': name, 'index': claim['index'], 'params': claim['params'],
            'workdir': os.path.relpath(folder, workdir), 'created': claim['created'],
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
    summary = train_fn(config, folder, epoch_callback=callback)
    record.update(state='stopped' if stop_info else 'finished',
                  num_params=summary.get('num_params'))
  except Exception as e:  # noqa: BLE001
    # Any error ends this run only: the sweep goes on, and bayes learns the region is bad.
    record['error'] = f'{type(e).__name__}: {e}'
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'error.txt'), 'w') as f:
      f.write(traceback.format_exc())
    print(f'sweep: run {name} failed: {record["error"]}', flush=True)
  record['wall_time_s'] = time.time() - t0
  rows = read_metrics(folder)
  accs = [r['val_acc'] for r in rows if isinstance(r.get('val_acc'), (int, float))]
  if accs:
    best = int(np.argmax(accs))
    record.update(best_val_acc=accs[best], final_val_acc=accs[-1],
                  best_epoch=rows[best]['epoch'], epochs=len(accs))
  record.update(hyperband=stop_info or None, ended=_now())
  return record


def _next_claim(workdir: str, spec: dict, base: ml_collections.ConfigDict, sweep_count: int,
                stack: contextlib.ExitStack) -> dict | None:
  """Under the sweep lock: an interrupted run to resume, else a newly drawn one, else None;
  the run's lock is entered on `stack`, so other workers see it as running."""
  with _locked(os.path.join(workdir, SWEEP_LOCK)):
    ended = {r['run'] for r in read_results(workdir)}
    claims = read_claims(workdir)
    for claim in claims:
      run_lock = os.path.join(run_dir(workdir, claim['run']), RUN_LOCK)
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
    extra = [k for k in searched_parameters(spec) if k not in dict(config_lib.NAME_FIELDS).values()]
    name = config_lib.hyperparameter_name(apply_sweep_params(base, params), extra)
    if os.path.exists(run_dir(workdir, name)):
      name += f'_{index + 1}'  # values drawn again once the space is exhausted
    claim = {'run': name, 'index': index, 'params': params, 'created': _now()}
    folder = run_dir(workdir, name)
    os.makedirs(folder)
    stack.enter_context(_locked(os.path.join(folder, RUN_LOCK)))
    _write_json(os.path.join(folder, RUN_FILE), claim)
    return claim


def _run_header(claim: dict, sweep_count: int, ended: list[dict]) -> str:
  """`sweep: run 3/20: NAME (2 ended, 10.5 min a run)`; no ETA, as other workers share the count."""
  line = f'sweep: run {claim["index"] + 1}/{sweep_count}: {claim["run"]}'
  walls = [r['wall_time_s'] for r in ended if isinstance(r.get('wall_time_s'), (int, float))]
  if walls:
    line += f' ({len(ended)} ended, {sum(walls) / len(walls) / 60:.1f} min a run)'
  return line


def _prepare(config: ml_collections.ConfigDict, workdir: str, spec: dict
             ) -> ml_collections.ConfigDict:
  """The base config of every run; writes WORKDIR/sweep.json, or refuses a rerun whose spec or
  base config differ, and checks the value space."""
  base = config.copy_and_resolve_references()
  if base.cache_dir:
    base.cache_dir = os.path.abspath(base.cache_dir)
  if base.wandb_mode == '':
    base.wandb_mode = 'offline'  # no W&B server assumed: `wandb sync` uploads the runs later
  os.makedirs(os.path.join(workdir, RUNS_DIR), exist_ok=True)
  base_d = _plain(base.to_dict())
  with _locked(os.path.join(workdir, SWEEP_LOCK)):
    old = read_spec(workdir)
    if old is None:
      _write_json(os.path.join(workdir, SPEC_FILE),
                  {'spec': spec, 'base_config': base_d, 'created': _now()})
  if old is not None:
    diffs = [f'sweep spec {old["spec"]} -> {spec}'] if old['spec'] != spec else []
    base_diff = config_lib.config_diff(config_lib.run_fields(old['base_config']),
                                       config_lib.run_fields(base_d))
    diffs += [base_diff] if base_diff else []
    if diffs:
      raise SweepError(f'{workdir} holds a sweep started with other settings '
                       f'({"; ".join(diffs)}). Continue it with the same command, or use another '
                       '--workdir')
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
  `overrides` are the fields set on the command line (see pin_overrides)."""
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
        print(_run_header(claim, sweep_count, read_results(workdir)), flush=True)
        record = _run_one(base, spec, workdir, claim, train_fn)
        # Appended, not rewritten: a line cut short by a kill is skipped by read_results.
        with (_locked(os.path.join(workdir, SWEEP_LOCK)),
              open(os.path.join(workdir, RESULTS_FILE), 'a') as f):
          f.write(json.dumps(_plain(record)) + '\n')
      acc = record['best_val_acc']
      print(f'sweep: {record["run"]}: {record["state"]}'
            + (f', best val_acc {acc:.4f} at epoch {record["best_epoch"]}' if acc is not None
               else ''), flush=True)
  results = read_results(workdir)
  done = sum(r['state'] != 'failed' for r in results)
  print(f'sweep: {len(results)} runs in {workdir} ({done} trained, {len(results) - done} failed)')
  if report:
    from cnn import sweep_report  # matplotlib and sklearn only when a report is wanted
    sweep_report.write_report(workdir)
  return sorted(results, key=lambda r: -(r['best_val_acc'] if r['best_val_acc'] is not None
                                         else -1.0))
