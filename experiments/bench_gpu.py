r"""The benchmark's GPU part: train-step images/s and MFU of ours vs PyTorch, and an epoch.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.bench_gpu --out=bench_gpu.jsonl
  python experiments/bench_gpu.py --dry_run --out=/tmp/dry.jsonl   # every part, tiny, on the CPU
  python -m experiments.bench_gpu --table_from=bench_gpu.jsonl       # the table of a past run

Measures, each cell (image size x batch size x dtype) in fresh processes:
  * ours: configs/optimal.py's train step (`cnn.train.steps_for(...).train`, no augmentation)
    fed by cnn.feeding.HostFeed (sliced on the host, copied each step) and DeviceFeed (the
    uint8 set on the GPU, each batch gathered there); float32 or config.dtype='bfloat16'.
  * torch: the same network (experiments.bench_measure.torch_model), Adam 1e-3, channels-last,
    each batch gathered from a uint8 set on the GPU; eager, then torch.compile (a failure is
    recorded); float32 or bfloat16 autocast. Both sides run at their default TF32 settings,
    which every record states.
  * MFU = 3 x forward FLOPs per image (cnn.count's textbook count) x images/s / the GPU's
    dense peak for the dtype (PEAK_TFLOPS; float32 counts at the TF32 peak where convolutions
    run in TF32, as both frameworks' defaults do on Hopper); None on a GPU not in the table.
  * e2e: two epochs of `cnn.train.train_and_evaluate` with augmentation on an in-memory
    iNaturalist-sized set of random images; the second (compile-free) epoch's time.
Times exclude warm-up; the first step's time less a later one's is reported as compile_s; a
cell's figure is the median of --rounds rounds. Ours' host and device feeds are interleaved
round by round.

Priority: the largest size and batch in every dtype (ours, torch eager, torch.compile), then
the e2e epoch, then the other cells (ours and torch eager), then their torch.compile. Nothing
starts with less than --min_task_s of --deadline_s left, and a child still running at the
deadline is killed; every result is a JSON line of --out, written as it comes, so a cut-off
run still reports. The child processes' output goes to the folder --out.logs/.

On the GPU machine (jax with CUDA, flax, optax, orbax-checkpoint, absl, numpy, pillow, torch;
no TensorFlow or W&B needed) cnn/ and configs/ also need ml-collections and PyYAML, which it
imports: carry their wheels along and `pip install --no-deps` them first (the script says so
before measuring anything when they are missing). The full plan is estimated (not yet
measured) at 15-17 min on an H200, about half of it torch.compile's compilations; the default
--deadline_s=480 cuts it at 8 min, after the largest cells and the e2e epoch, which come first.
"""

import importlib.util
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ''):
  # Run as a script (python experiments/bench_gpu.py): sys.path holds experiments/, not the
  # repository root that `experiments` is imported from.
  sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS

# Dense (not 2:4 sparse) peak TFLOP/s of NVIDIA's datasheets, by a part of jax's device_kind /
# torch's device name. PCIe and NVL cards run slower clocks: they are not these rows.
PEAK_TFLOPS = {
    'H200': {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0},
    'H100': {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0},  # SXM
}

# What --dry_run changes, unless given on the command line: every part, tiny, on the CPU.
DRY_RUN = {'sizes': ['96'], 'batches': ['8'], 'rounds': 1, 'steps_per_round': 2,
           'warmup_steps': 1, 'min_round_s': 0.0, 'e2e_images': 64, 'e2e_holdout': 16,
           'e2e_size': 96}
SETTINGS = ('frameworks', 'parts', 'sizes', 'batches', 'dtypes', 'rounds', 'steps_per_round',
            'warmup_steps', 'min_round_s', 'e2e_images', 'e2e_holdout', 'e2e_size',
            'e2e_batch', 'e2e_dtype', 'deadline_s', 'min_task_s')
# What ours needs; PyYAML because ml_collections imports it. A missing torch is recorded instead.
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


def settings_from_flags() -> dict[str, Any]:
  s = {name: FLAGS[name].value for name in SETTINGS}
  if FLAGS.dry_run:
    s.update({k: v for k, v in DRY_RUN.items() if not FLAGS[k].present})
  s['sizes'] = sorted((int(x) for x in s['sizes']), reverse=True)
  s['batches'] = sorted((int(x) for x in s['batches']), reverse=True)
  return s


# ---------------------------------------------------------------------------- the plan


class Task(NamedTuple):
  part: str  # a key of bench_gpu_measure.PARTS
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


# ---------------------------------------------------------------------------- children


def run_child(task: Task, timing: dict, timeout_s: float, log_path: str) -> list[dict]:
  """Runs `task` in a fresh process; its records, and an error record per missing variant."""
  with tempfile.TemporaryDirectory(prefix='bench_gpu_') as tmp:
    results = os.path.join(tmp, 'results.jsonl')
    spec = os.path.join(tmp, 'spec.json')
    with open(spec, 'w') as f:
      json.dump({'part': task.part, 'args': task.args, 'timing': timing, 'results': results}, f)
    rc = _wait(spec, timeout_s, log_path)
    records = []
    if os.path.exists(results):
      with open(results) as f:
        records = [json.loads(line) for line in f if line.strip()]
  why = (f'killed at the deadline ({timeout_s:.0f} s left)' if rc is None else
         f'the process exited with status {rc}: {_tail(log_path)}')
  done = {r['variant'] for r in records}
  return records + [{**task.args, 'framework': FRAMEWORK[task.part], 'variant': v, 'error': why}
                    for v in task.variants if v not in done]


def _wait(spec: str, timeout_s: float, log_path: str) -> int | None:
  """The child's exit status; None if it ran out of time (it and its children are killed)."""
  with open(log_path, 'w') as log:
    # Its own session: torch.compile's compile workers die with it.
    proc = subprocess.Popen([sys.executable, '-m', 'experiments.bench_gpu_measure', spec],
                            cwd=ROOT, env={**os.environ, **CHILD_ENV}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      return None


def _tail(path: str, lines: int = 3) -> str:
  with open(path, errors='replace') as f:
    return ' | '.join(line.strip() for line in f.readlines()[-lines:])[-1500:]


# ---------------------------------------------------------------------------- MFU


def peak_tflops(device_kind: str, precision: str) -> float | None:
  """The dense peak of `device_kind` at 'bf16', 'tf32' or 'fp32'; None for other devices."""
  if 'PCIe' in device_kind or 'NVL' in device_kind:
    return None
  for name, peaks in PEAK_TFLOPS.items():
    if name in device_kind:
      return peaks[precision]
  return None


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


# ---------------------------------------------------------------------------- the run


def run(s: dict, out: str) -> list[dict]:
  """Every task of plan(s) that the deadline allows; each record written to `out` at once."""
  t0, records, flops = time.monotonic(), [], {}
  logs = pathlib.Path(out + '.logs')
  logs.mkdir(parents=True, exist_ok=True)
  timing = {k: s[k] for k in ('rounds', 'steps_per_round', 'warmup_steps', 'min_round_s')}
  with open(out, 'w') as f:
    write = lambda r: (f.write(json.dumps(r) + '\n'), f.flush())
    write({'kind': 'run', 'settings': s, 'dry_run': FLAGS.dry_run, 'argv': sys.argv,
           'host': platform.node(), 'python': platform.python_version(),
           'started': time.strftime('%Y-%m-%d %H:%M:%S')})
    for i, task in enumerate(plan(s)):
      if task.part == 'e2e':
        task.args['batch'] = e2e_batch(s, records)
      left = s['deadline_s'] - (time.monotonic() - t0)
      print(f'[{time.monotonic() - t0:5.0f} s] {task.name}', flush=True)
      if left < s['min_task_s']:
        new = [{**task.args, 'framework': FRAMEWORK[task.part],
                'variant': v, 'skipped': True, 'error': f'skipped: {left:.0f} s left'}
               for v in task.variants]
      else:
        log = logs / f'{i:02d}_{task.name.replace(" ", "_")}.log'
        new = run_child(task, timing, left, str(log))
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
  if r.get('error'):
    return f'{head} {r["error"][:300]}'
  if r['variant'] == 'e2e':
    return f'{head} epoch 2 {r["epoch_time_s"]:.2f} s ({r["images_per_s"]:.0f} img/s)'
  return f'{head} {r["images_per_s"]:.0f} img/s, compile {r["compile_s"]:.1f} s'


# ---------------------------------------------------------------------------- the table

COLUMNS = (('ours', 'host'), ('ours', 'device'), ('torch', 'eager'), ('torch', 'compile'))


def _cell(r: dict | None) -> str:
  if r is None:
    return '-'
  if r.get('error'):
    return 'skipped' if r.get('skipped') else 'error'
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


def _aligned(rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def format_table(records: list[dict]) -> str:
  """Images/s per cell and variant, ours/best-torch, MFU; the e2e epoch; every error."""
  steps = [r for r in records if r.get('kind') == 'measurement' and r['variant'] != 'e2e']
  by = {(r['size'], r['batch'], r['dtype'], r['framework'], r['variant']): r for r in steps}
  keys = sorted({k[:3] for k in by}, key=lambda k: (-k[0], -k[1], k[2]))
  header = ['size', 'batch', 'dtype', 'ours host', 'ours device', 'torch eager',
            'torch compile', 'ours/torch', 'MFU ours', 'MFU torch']
  lines = ['train step, images/s (ours/torch: the faster of each)',
           _aligned([header] + [_row(k, by) for k in keys]) if keys else '(none)']
  for r in records:
    if r.get('variant') == 'e2e':
      lines.append(f'e2e: {r.get("images")} images {r["size"]}px batch {r["batch"]} '
                   f'{r["dtype"]} augmented: ' + (
                       r['error'] if r.get('error') else
                       f'epoch 2 {r["epoch_time_s"]:.2f} s ({r["images_per_s"]:.0f} img/s), '
                       f'epoch 1 {r["first_epoch_time_s"]:.2f} s, data on device: '
                       f'{r["data_on_device"]}'))
  lines += [f'error: {r["framework"]} {r["variant"]} {r["size"]}px batch {r["batch"]} '
            f'{r["dtype"]}: {r["error"][:300]}' for r in steps if r.get('error')
            and not r.get('skipped')]
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
