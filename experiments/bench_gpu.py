r"""The GPU benchmark: train-step images/s and MFU of ours vs PyTorch, and an epoch (docs/gpu.md).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.bench_gpu --out=bench_gpu.jsonl
  python experiments/bench_gpu.py --dry_run --out=/tmp/dry.jsonl   # every part, tiny, on the CPU
  python -m experiments.bench_gpu --table_from=bench_gpu.jsonl       # the table of a past run

Each cell (image size x batch size x dtype) runs its variants in fresh processes of
experiments/bench_harness.py, the CPU benchmark's harness, their rounds interleaved: ours fed
from the host or from device memory (cnn.feeding's HostFeed, DeviceFeed); PyTorch eager and
torch.compile (the dry run compiles with the 'aot_eager' backend, not minutes of C++; without
torch its cells say "skipped: not installed"); then two epochs of `cnn.runs.train_and_evaluate`
on random images in memory. MFU = 3 x forward FLOPs per image (cnn.count) x images/s / the
GPU's dense peak for the dtype (PEAK_TFLOPS; float32 at the TF32 peak where the convolutions run
in TF32, both frameworks' default); None on other GPUs. The largest cells come first, then the
epoch, then the rest, then their torch.compile; nothing starts with less than --min_task_s of
--deadline_s left, a child still running at the deadline is killed, and each record is a JSON
line of --out as it comes, so a cut-off run still reports. On the GPU machine cnn/ and configs/
also need ml-collections and PyYAML: `pip install --no-deps` their wheels (the script checks).
"""

import importlib.util
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

if __package__ in (None, ''):
  # Run as a script (python experiments/bench_gpu.py): sys.path holds experiments/, not the
  # repository root that `experiments` is imported from.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import bench_harness  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS

# Dense (not 2:4 sparse) peak TFLOP/s of NVIDIA's datasheets, by a part of jax's device_kind /
# torch's device name. PCIe and NVL cards run slower clocks: they are not these rows.
PEAK_TFLOPS = {
    'H200': {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0},
    'H100': {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0},  # SXM
}

# What --dry_run changes, unless given on the command line: every part, tiny, on the CPU.
DRY_RUN = {'sizes': ['96'], 'batches': ['8'], 'dtypes': ['bfloat16'], 'rounds': 1,
           'steps_per_round': 2, 'warmup_steps': 1, 'min_round_s': 0.0, 'e2e_images': 64,
           'e2e_holdout': 16, 'e2e_size': 96, 'torch_compile_backend': 'aot_eager'}
SETTINGS = ('frameworks', 'parts', 'sizes', 'batches', 'dtypes', 'rounds', 'steps_per_round',
            'warmup_steps', 'min_round_s', 'e2e_images', 'e2e_holdout', 'e2e_size',
            'e2e_batch', 'e2e_dtype', 'deadline_s', 'min_task_s', 'torch_compile_backend')
# What ours needs; PyYAML because ml_collections imports it. Without torch its cells are skipped.
OURS_NEEDS = ('jax', 'flax', 'optax', 'orbax', 'ml_collections', 'yaml', 'PIL')
CHILD_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}  # JAX takes GPU memory as it needs it


def define_flags() -> None:
  """Defined on use: importing this module (the tests) adds no flags."""
  flags.DEFINE_bool('dry_run', False, f'Every part on the CPU at tiny sizes: {DRY_RUN}.')
  flags.DEFINE_string('out', 'bench_gpu.jsonl', 'The JSON lines of results.')
  flags.DEFINE_string('table_from', '', 'Print the table of this results file; measure nothing.')
  flags.DEFINE_float('deadline_s', 480, 'Stop starting (and kill) measurements after this.')
  flags.DEFINE_float('min_task_s', 15, 'Start no measurement with less time than this left.')
  flags.DEFINE_list('frameworks', ['ours', 'torch', 'torch_compile'],
                    'ours, torch (eager), torch_compile (torch.compile).')
  flags.DEFINE_list('parts', ['train_step', 'e2e'], 'train_step, e2e.')
  flags.DEFINE_list('sizes', ['256', '128'], 'Image sizes of the train-step cells.')
  flags.DEFINE_list('batches', ['256', '32'], 'Batch sizes of the train-step cells.')
  flags.DEFINE_list('dtypes', ['bfloat16', 'float32'], 'Compute dtypes: bfloat16, float32.')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds per variant; the median is reported.')
  flags.DEFINE_integer('steps_per_round', 10, 'At least this many steps a round.')
  flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after the first.')
  flags.DEFINE_float('min_round_s', 0.3, 'More steps a round where it would be shorter.')
  flags.DEFINE_integer('e2e_images', 9000, 'Training images of the e2e epoch (iNat: ~9,000).')
  flags.DEFINE_integer('e2e_holdout', 1000, 'Validation images of the e2e run.')
  flags.DEFINE_integer('e2e_size', 256, 'Image size of the e2e run.')
  flags.DEFINE_integer('e2e_batch', 0, 'Batch size of the e2e run; 0: the batch at which ours '
                       'ran fastest at e2e_size so far (the largest if none ran).')
  flags.DEFINE_string('e2e_dtype', 'float32', 'Compute dtype of the e2e run.')
  flags.DEFINE_string('torch_compile_backend', 'inductor', "torch.compile's backend.")


def settings_from_flags() -> dict[str, Any]:
  s = {name: FLAGS[name].value for name in SETTINGS}
  if FLAGS.dry_run:
    s.update({k: v for k, v in DRY_RUN.items() if not FLAGS[k].present})
  s['sizes'] = sorted((int(x) for x in s['sizes']), reverse=True)
  s['batches'] = sorted((int(x) for x in s['batches']), reverse=True)
  return s


class Task(NamedTuple):
  part: str  # a key of FRAMEWORK
  args: dict  # the cell; for e2e its batch is None until the task starts
  variants: tuple[str, ...]  # the records it should leave

  @property
  def name(self) -> str:
    a = self.args
    batch = a['batch'] if a['batch'] is not None else 'auto'
    return f'{self.part} {a["size"]}px batch {batch} {a["dtype"]}'


VARIANTS = {'ours': ('host', 'device'), 'torch': ('eager',), 'torch_compile': ('compile',),
            'e2e': ('e2e',)}
FRAMEWORK = {'ours': 'ours', 'torch': 'torch', 'torch_compile': 'torch', 'e2e': 'ours'}
# What a variant's child adds to its cell (experiments/bench_measure.py's step builders).
VARIANT_ARGS = {'host': {'feed': 'host'}, 'device': {'feed': 'device'}, 'eager': {}}


def plan(s: dict) -> list[Task]:
  """The measurements, the most important first (see the module docstring)."""
  cells = [{'size': z, 'batch': b, 'dtype': d}
           for z in s['sizes'] for b in s['batches'] for d in s['dtypes']]
  if 'train_step' not in s['parts']:
    cells = []
  tasks = lambda cs, parts: [Task(p, c, VARIANTS[p]) for c in cs for p in parts
                             if p in s['frameworks']]
  head = [c for c in cells if (c['size'], c['batch']) == (s['sizes'][0], s['batches'][0])]
  rest = [c for c in cells if c not in head]
  e2e = [Task('e2e', {'size': s['e2e_size'], 'batch': None, 'dtype': s['e2e_dtype'],
                      'images': s['e2e_images'], 'holdout': s['e2e_holdout']}, VARIANTS['e2e'])]
  # torch.compile's compilation takes the longest: the other cells' wait for the end.
  return (tasks(head, ('ours', 'torch', 'torch_compile')) + (e2e if 'e2e' in s['parts'] else [])
          + tasks(rest, ('ours', 'torch')) + tasks(rest, ('torch_compile',)))


def e2e_batch(s: dict, records: list[dict]) -> int:
  if s['e2e_batch']:
    return s['e2e_batch']
  ours = [r for r in records if r.get('framework') == 'ours' and r.get('images_per_s')
          and r['size'] == s['e2e_size'] and r['variant'] in VARIANTS['ours']]
  return max(ours, key=lambda r: r['images_per_s'])['batch'] if ours else s['batches'][0]


def run_child(task: Task, s: dict, timeout_s: float, logs) -> list[dict]:
  """Runs `task` in fresh processes (one per variant, their rounds interleaved); a record per
  variant: its figure, or what stopped it."""
  cell = {**task.args, 'framework': FRAMEWORK[task.part]}
  if task.part == 'e2e':
    records = bench_harness.run_once('ours_e2e', {**cell, 'epochs': 2}, logs(task.name),
                                     env=CHILD_ENV, timeout=timeout_s)
    return [{**cell, 'variant': 'e2e', **r} for r in (records or [{'error': 'no record'}])[-1:]]
  variant_args = {**VARIANT_ARGS, 'compile': {'compile': s['torch_compile_backend']}}
  workers = {v: bench_harness.StepWorker({**cell, **variant_args[v]},
                                         lambda v=v: logs(f'{task.name} {v}'), CHILD_ENV)
             for v in task.variants}
  timing = {k: s[k] for k in ('rounds', 'steps_per_round', 'warmup_steps', 'min_round_s')}
  results = bench_harness.time_steps(workers, timing, deadline=time.monotonic() + timeout_s)
  return [{**cell, 'variant': v, **r} for v, r in results.items()]


def peak_tflops(device_kind: str, precision: str) -> float | None:
  """The dense peak of `device_kind` at 'bf16', 'tf32' or 'fp32'; None for other devices."""
  slower = 'PCIe' in device_kind or 'NVL' in device_kind
  names = [n for n in PEAK_TFLOPS if n in device_kind and not slower]
  return PEAK_TFLOPS[names[0]][precision] if names else None


def add_mfu(record: dict, flops_by_size: dict[int, float]) -> dict:
  """`record` with forward FLOPs (ours' count at its size), the peak it is held to and MFU."""
  flops = record.get('forward_flops_per_image') or flops_by_size.get(record['size'])
  if record.get('forward_flops_per_image'):
    flops_by_size[record['size']] = flops
  precision = ('bf16' if record['dtype'] == 'bfloat16' else
               'tf32' if record.get('f32_uses_tf32') else 'fp32')
  peak = peak_tflops(record.get('device_kind') or '', precision)
  ips = record.get('images_per_s')
  mfu = 3 * flops * ips / (peak * 1e12) if peak and flops and ips else None
  return {**record, 'forward_flops_per_image': flops, 'peak_precision': precision,
          'peak_tflops': peak, 'mfu': mfu}


def run(s: dict, out: str) -> list[dict]:
  """Every task of plan(s) that the deadline allows; each record written to `out` at once."""
  t0, records, flops = time.monotonic(), [], {}
  logs = bench_harness.log_paths(out + '.logs')
  with open(out, 'w') as f:
    write = lambda r: (f.write(json.dumps(r) + '\n'), f.flush())
    write({'kind': 'run', 'settings': s, 'dry_run': FLAGS.dry_run, 'argv': sys.argv,
           'machine': bench_harness.machine(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')})
    for task in plan(s):
      if task.part == 'e2e':
        task.args['batch'] = e2e_batch(s, records)
      left = s['deadline_s'] - (time.monotonic() - t0)
      print(f'[{time.monotonic() - t0:5.0f} s] {task.name}', flush=True)
      if left < s['min_task_s']:
        new = [{**task.args, 'framework': FRAMEWORK[task.part], 'variant': v,
                'skipped': f'{left:.0f} s left before the deadline'} for v in task.variants]
      else:
        new = run_child(task, s, left, logs)
      for r in new:
        r = {'kind': 'measurement', **add_mfu(r, flops),
             'elapsed_s': time.monotonic() - t0}
        records.append(r)
        write(r)
        print('    ' + _brief(r), flush=True)
    write({'kind': 'done', 'total_s': time.monotonic() - t0})
  return records


def _brief(r: dict) -> str:
  head = f'{r["framework"]} {r["variant"]}:'
  if bench_harness.problem(r):
    return f'{head} {bench_harness.problem(r)}'
  if r['variant'] == 'e2e':
    return f'{head} epoch 2 {r["epoch_time_s"]:.2f} s ({r["images_per_s"]:.0f} img/s)'
  return f'{head} {r["images_per_s"]:.0f} img/s, compile {r["compile_s"]:.1f} s'


COLUMNS = (('ours', 'host'), ('ours', 'device'), ('torch', 'eager'), ('torch', 'compile'))


def _cell(r: dict | None) -> str:
  if r is None or bench_harness.problem(r):
    return bench_harness.problem(r).split(':')[0] if r else '-'
  return f'{r["images_per_s"]:.0f}'


def _best(rs: list[dict | None]) -> dict | None:
  ok = [r for r in rs if r and r.get('images_per_s')]
  return max(ok, key=lambda r: r['images_per_s']) if ok else None


def _pct(r: dict | None) -> str:
  return f'{100 * r["mfu"]:.1f}%' if r and r.get('mfu') is not None else '-'


def _row(key: tuple, by: dict) -> list[str]:
  rs = [by.get((*key, fw, v)) for fw, v in COLUMNS]
  ours, torch = _best(rs[:2]), _best(rs[2:])
  ratio = f'{ours["images_per_s"] / torch["images_per_s"]:.2f}' if ours and torch else '-'
  return [str(key[0]), str(key[1]), key[2], *map(_cell, rs), ratio, _pct(ours), _pct(torch)]


def format_table(records: list[dict]) -> str:
  """Images/s per cell and variant, ours/best-torch, MFU; the e2e epoch; every error."""
  steps = [r for r in records if r.get('kind') == 'measurement' and r['variant'] != 'e2e']
  by = {(r['size'], r['batch'], r['dtype'], r['framework'], r['variant']): r for r in steps}
  keys = sorted({k[:3] for k in by}, key=lambda k: (-k[0], -k[1], k[2]))
  header = ['size', 'batch', 'dtype', 'ours host', 'ours device', 'torch eager',
            'torch compile', 'ours/torch', 'MFU ours', 'MFU torch']
  lines = ['train step, images/s (ours/torch: the faster of each)',
           bench_harness.aligned([header] + [_row(k, by) for k in keys]) if keys else '(none)']
  for r in records:
    if r.get('variant') == 'e2e':
      lines.append(f'e2e: {r.get("images")} images {r["size"]}px batch {r["batch"]} '
                   f'{r["dtype"]} augmented: ' + (
                       bench_harness.problem(r) or
                       f'epoch 2 {r["epoch_time_s"]:.2f} s ({r["images_per_s"]:.0f} img/s), '
                       f'epoch 1 {r["first_epoch_time_s"]:.2f} s, data on device: '
                       f'{r["data_on_device"]}'))
  lines += [f'{r["framework"]} {r["variant"]} {r["size"]}px batch {r["batch"]} {r["dtype"]}: '
            f'{bench_harness.problem(r)[:300]}' for r in steps if 'error' in r]
  return '\n'.join(lines)


def read_records(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def check_settings(s: dict) -> None:
  """app.UsageError for an unknown framework or part, or a missing package ours needs: said
  before any device time is spent."""
  unknown = ((set(s['frameworks']) - set(FRAMEWORK) - {'e2e'})
             | (set(s['parts']) - {'train_step', 'e2e'}))
  if unknown:
    raise app.UsageError(f'unknown --frameworks or --parts {sorted(unknown)}')
  missing = [m for m in OURS_NEEDS if importlib.util.find_spec(m) is None]
  if missing and ('ours' in s['frameworks'] or 'e2e' in s['parts']):
    raise app.UsageError(f'cannot import {missing}: pip install them (ml_collections and '
                         'PyYAML are small wheels to carry along; --no-deps)')


def main(argv):
  del argv
  if FLAGS.table_from:
    print(format_table(read_records(FLAGS.table_from)))
    return
  s = settings_from_flags()
  check_settings(s)
  records = run(s, FLAGS.out)
  print(format_table(records))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
