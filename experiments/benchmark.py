r"""CPU timings of train step, compilation, input pipeline and a whole run: ours vs Keras 3/TF
vs PyTorch (docs/speed.md).

  python -m experiments.benchmark                     # everything, about 10 min on 2 cores
  python -m experiments.benchmark --parts=train_step --sizes=128 --frameworks=ours,torch
  python -m experiments.benchmark --parts=train_step --sizes=128,256 --rounds=5 \
      --steps_per_round=10 --compare_with=../other_checkout  # our step here / in that checkout

Each measurement runs in fresh processes (experiments/bench_harness.py; what they run:
experiments/bench_measure.py). `train_step`: a few steps of every framework in turn, the order
reversed every other round, medians over rounds, so load from other users of the machine falls
on all alike; with --compare_with each framework also runs with that checkout's `cnn` and
`configs`, both sides in a fresh process each round. `compile`: the first step's time less a
later one's. `pipeline`: `cnn.input_pipeline` decoding full-size photos into its cache once, then
serving batches, against Keras' `image_dataset_from_directory`, which decodes every epoch.
`e2e`: --e2e_epochs epochs with augmentation from undecoded images, `cnn.runs.train_and_evaluate`
against the reference recipe (that loader, Keras' augmentation layers, `model.fit`). Keras and
PyTorch need the `bench` extra; without it their measurements say "skipped: not installed".
Every measurement records a figure, an error or a skip; the report lists each error and skip.
The children's output goes to --out.logs/.
"""

import json
import os
import pathlib
import sys
import tempfile
import time

if __package__ in (None, ''):
  # Run as a script (python experiments/benchmark.py): sys.path holds experiments/, not the
  # repository that `cnn`, `configs` and `experiments` live in.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import bench_harness  # pylint: disable=g-import-not-at-top
from experiments import bench_measure  # pylint: disable=g-import-not-at-top

PARTS = ('train_step', 'compile', 'pipeline', 'e2e')
FRAMEWORKS = (*bench_measure.OURS, 'keras', 'torch')
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'

_PARTS = flags.DEFINE_list('parts', list(PARTS), f'Parts to run: {", ".join(PARTS)}.')
_SIZES = flags.DEFINE_list('sizes', ['128', '256'], 'Image sizes of the train-step part.')
_FRAMEWORKS = flags.DEFINE_list(
    'frameworks', ['ours', 'ours_bf16', 'keras', 'torch'],
    'Frameworks of the train-step and compile parts: ours, ours_bf16 (config.dtype=bfloat16), '
    'flax_nn_conv (ours with nn.Conv), keras, torch. With --compare_with the default is ours.')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Interleaved rounds of the train-step part.')
_STEPS = flags.DEFINE_integer('steps_per_round', 2, 'Timed steps per framework and round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_MALLOC = flags.DEFINE_list(
    'malloc', ['system'], 'Allocators of the train-step part (glibc maps every large buffer '
    'afresh, so each step page-faults its activations): system, hugepages (glibc in 2 MB '
    'pages), tcmalloc (LD_PRELOAD of libtcmalloc_minimal.so.4).')
_COMPARE_WITH = flags.DEFINE_string(
    'compare_with', '', 'Another checkout of this repository: the train-step part also runs '
    'each framework with its cnn/ and configs/, a fresh process each round, and reports '
    'here / there.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', os.environ.get('CNN_TEST_DATA', str(_SHARED_DATA / 'monkeys10')),
    'Image folder (train/<class>/, val/<class>/) of the e2e part.')
_FULLRES_DIR = flags.DEFINE_string('fullres_dir', str(_SHARED_DATA / 'monkeys10_fullres_sample'),
                                   'Full-size photos (train/<class>/) of the pipeline part.')
_E2E_SIZE = flags.DEFINE_integer('e2e_size', 128, 'Image size of the pipeline and e2e parts.')
_E2E_EPOCHS = flags.DEFINE_integer('e2e_epochs', 5, 'Epochs of the e2e part.')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Where the JSON results go.')
_CONV_IMPL = flags.DEFINE_enum('conv_impl', 'auto', ['auto', 'cpu_eigen', 'xla'],
                               'Our convolutions: config.conv_impl of the runs timed as ours.')


def _check_flags() -> None:
  """app.UsageError for a part, allocator, framework or checkout the benchmark does not know."""
  known = {'parts': PARTS, 'malloc': tuple(bench_harness.MALLOC_ENV), 'frameworks': FRAMEWORKS}
  for name, values in known.items():
    if unknown := set(flags.FLAGS[name].value) - set(values):
      raise app.UsageError(f'unknown --{name} {sorted(unknown)}; known: {sorted(values)}')
  there = _COMPARE_WITH.value
  if there and not os.path.isdir(os.path.join(there, 'cnn')):
    raise app.UsageError(f'--compare_with={there} is not a checkout of this repository')


def main(argv):
  del argv
  _check_flags()
  parts, t0 = set(_PARTS.value), time.perf_counter()
  out = {'machine': bench_harness.machine(), 'argv': sys.argv}
  if _COMPARE_WITH.value:
    out['compare_with'] = {'path': os.path.abspath(_COMPARE_WITH.value),
                           'git': bench_harness.git_describe(_COMPARE_WITH.value)}
  logs = bench_harness.log_paths(_OUT.value + '.logs')
  with tempfile.TemporaryDirectory(prefix='cnn_bench_') as tmp:
    if parts & {'train_step', 'compile'}:
      out['train_step'] = _train_step_part(logs)
    if 'pipeline' in parts:
      out['input_pipeline'] = _pipeline_part(tmp, logs)
    if 'e2e' in parts:
      out['end_to_end'] = _e2e_part(tmp, logs)
  out['total_s'] = time.perf_counter() - t0
  print(report(out))
  pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=2) + '\n')
  print(f'wrote {_OUT.value}')


def _columns() -> list[tuple[str, str, str]]:
  """(column, framework, checkout or '' for this one) of the train-step table."""
  there = _COMPARE_WITH.value
  frameworks = _FRAMEWORKS.value if not there or flags.FLAGS['frameworks'].present else ['ours']
  columns = []
  for fw in frameworks:
    columns.append((fw, fw, ''))
    if there:
      columns.append((f'{fw}@{pathlib.Path(there).resolve().name}', fw, os.path.abspath(there)))
  return columns


def time_train_steps(size: int, malloc: str, logs) -> dict[str, dict]:
  """Per column of the table: its median step over interleaved rounds, and compile_s."""
  args = {'size': size, 'batch': _BATCH.value, 'conv_impl': _CONV_IMPL.value}
  workers = {col: bench_harness.StepWorker({**args, 'framework': fw},
                                           lambda col=col: logs(f'{size}px_{malloc}_{col}'),
                                           bench_harness.MALLOC_ENV[malloc], tree)
             for col, fw, tree in _columns()}
  timing = {'rounds': _ROUNDS.value, 'steps_per_round': _STEPS.value, 'warmup_steps': 1,
            'min_round_s': 0.0}
  return bench_harness.time_steps(workers, timing, fresh=bool(_COMPARE_WITH.value))


def _train_step_part(logs) -> dict:
  """{malloc: {size: {column: record}}}."""
  out = {}
  for malloc in _MALLOC.value:
    for size in (int(s) for s in _SIZES.value):
      print(f'train step at {size}px, {malloc} malloc ...', flush=True)
      out.setdefault(malloc, {})[str(size)] = time_train_steps(size, malloc, logs)
  return out


def _run(framework: str, measure: str, args: dict, logs) -> dict:
  """One measurement's record in a fresh child, or what stopped it."""
  records = bench_harness.run_once(measure, {**args, 'framework': framework}, logs(measure),
                                   env=bench_harness.MALLOC_ENV[_MALLOC.value[0]])
  return records[-1] if records else {'error': f'{measure} recorded nothing'}


def _pipeline_part(tmp: str, logs) -> dict:
  """Decoding the full-size photos: our one-off cache build against Keras' every epoch."""
  if not os.path.isdir(os.path.join(_FULLRES_DIR.value, 'train')):
    return {'error': f'no photos at {_FULLRES_DIR.value}/train (--fullres_dir)'}
  print('input pipeline ...', flush=True)
  args = {'data_dir': bench_measure.fullres_folder(_FULLRES_DIR.value, f'{tmp}/fullres'),
          'size': _E2E_SIZE.value, 'batch': _BATCH.value}
  return {'size': _E2E_SIZE.value, 'photos': _FULLRES_DIR.value,
          'ours': _run('ours', 'ours_pipeline', {**args, 'cache_dir': f'{tmp}/fullres_cache'},
                       logs),
          'keras': _run('keras', 'keras_pipeline', args, logs)}


def _e2e_part(tmp: str, logs) -> dict:
  """--e2e_epochs epochs with augmentation, from nothing decoded, ours against Keras'."""
  if not os.path.isdir(os.path.join(_DATA_DIR.value, 'train')):
    return {'error': f'no image folder at {_DATA_DIR.value}/train (--data_dir)'}
  print('end to end ...', flush=True)
  args = {'data_dir': _DATA_DIR.value, 'size': _E2E_SIZE.value, 'batch': _BATCH.value,
          'epochs': _E2E_EPOCHS.value}
  return {'size': _E2E_SIZE.value,
          'ours': _run('ours', 'ours_e2e', {**args, 'cache_dir': f'{tmp}/cache',
                                            'conv_impl': _CONV_IMPL.value}, logs),
          'keras': _run('keras', 'keras_e2e', args, logs)}


def _fmt(r: dict, key: str, spec: str = '.1f') -> str:
  """r[key], or what the record holds instead: error, skipped."""
  if bench_harness.problem(r):
    return bench_harness.problem(r).split(':')[0]
  return format(r[key], spec) if isinstance(r.get(key), (int, float)) else '-'


def _ratio(a, b) -> str:
  ok = all(isinstance(x, (int, float)) and x for x in (a, b))
  return f'{a / b:.2f}' if ok else '-'


def _train_step_lines(by_malloc: dict) -> list[str]:
  cols = [c for c, _, _ in _columns()]
  ips = lambda r: r.get('images_per_s')
  rows = [['malloc', 'size', *cols, *(f'{cols[0]}/{c}' for c in cols[1:]),
           *(f'compile_s {c}' for c in cols)]]
  for malloc, by_size in by_malloc.items():
    for size, row in by_size.items():
      rows.append([malloc, size, *(_fmt(row[c], 'images_per_s') for c in cols),
                   *(_ratio(ips(row[cols[0]]), ips(row[c])) for c in cols[1:]),
                   *(_fmt(row[c], 'compile_s') for c in cols)])
  return [f'train step, images/s (median of {_ROUNDS.value} interleaved rounds); compile_s: the '
          'first step less a later one', bench_harness.aligned(rows)]


def _pipeline_line(p: dict) -> str:
  o, k = p['ours'], p['keras']
  return (f'input pipeline, full-size photos to {p["size"]}px: ours decodes and caches '
          f'{_fmt(o, "cold_images_per_s")} img/s once, Keras image_dataset_from_directory '
          f'decodes {_fmt(k, "images_per_s")} img/s every epoch (median; fastest epoch '
          f'{_fmt(k, "fastest_images_per_s")}): '
          f'{_ratio(o.get("cold_images_per_s"), k.get("images_per_s"))}x; ours '
          f'then serves {_fmt(o, "cached_images_per_s", ".0f")} img/s from the cache')


def _e2e_line(e: dict) -> str:
  o, k = e['ours'], e['keras']
  speedup = lambda key: _ratio(k.get(key), o.get(key))
  return (f'end to end at {e["size"]}px, {o.get("epochs", "-")} epochs with augmentation, from '
          f'undecoded images: ours {_fmt(o, "wall_s")} s, Keras {_fmt(k, "wall_s")} s: '
          f'{speedup("wall_s")}x; median epoch after the first (train + validation) ours '
          f'{_fmt(o, "median_later_epoch_s")} s, Keras {_fmt(k, "median_later_epoch_s")} s: '
          f'{speedup("median_later_epoch_s")}x')


def report(out: dict) -> str:
  """The printed table: every part's figures, then each error and skip."""
  m = out['machine']
  load = m['load_average_at_start']
  lines = [f'{m["cores"]} cores, {m["cpu_model"]}, load average at start '
           f'{f"{load[0]:.2f}" if load else "-"}']
  if 'compare_with' in out:
    lines.append(f'compared with {out["compare_with"]["path"]} ({out["compare_with"]["git"]})')
  if 'train_step' in out:
    lines += _train_step_lines(out['train_step'])
  for key, line in (('input_pipeline', _pipeline_line), ('end_to_end', _e2e_line)):
    if key in out and 'error' not in out[key]:
      lines.append(line(out[key]))
  lines += bench_harness.problems({k: v for k, v in out.items() if k != 'machine'})
  return '\n'.join(lines + [f'total {out["total_s"]:.0f} s'])


if __name__ == '__main__':
  app.run(main)
