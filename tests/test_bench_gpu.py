"""experiments/bench_gpu.py: its dry run on the CPU, the deadline, the plan's order, MFU."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from experiments import bench_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'experiments' / 'bench_gpu.py'
HAS_TORCH = importlib.util.find_spec('torch') is not None


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
  """The whole dry run, as a script from another folder; torch eager only where it is (its
  compile, on the CPU, would take minutes)."""
  tmp = tmp_path_factory.mktemp('bench_gpu')
  out = tmp / 'dry.jsonl'
  proc = _run(tmp, '--dry_run', f'--out={out}',
              '--frameworks=ours,torch' if HAS_TORCH else '--frameworks=ours')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, bench_gpu.read_records(str(out))


def _measured(records):
  return {(r['framework'], r['variant'], r['dtype']): r for r in records
          if r.get('kind') == 'measurement'}


# The whole dry run is an end-to-end run of every part in child processes: a longer test.
@pytest.mark.slow
def test_the_dry_run_writes_every_measurement_as_a_json_line(dry_run):
  _, records = dry_run
  assert records[0]['kind'] == 'run' and records[0]['dry_run']
  assert records[0]['settings']['sizes'] == [96]
  assert records[-1]['kind'] == 'done'
  got = _measured(records)
  for dtype in ('bfloat16', 'float32'):
    for variant in ('host', 'device'):
      r = got[('ours', variant, dtype)]
      assert 'error' not in r, r['error']
      assert r['images_per_s'] > 0 and r['compile_s'] >= 0 and len(r['round_step_s']) == 1
      assert r['forward_flops_per_image'] > 0
      assert r['mfu'] is None  # the CPU is not in the peak table
      assert 'jax_default_matmul_precision' in r and r['f32_uses_tf32'] is False
    if HAS_TORCH:
      assert 'cudnn_allow_tf32' in got[('torch', 'eager', dtype)]
  e2e = got[('ours', 'e2e', 'float32')]
  assert 'error' not in e2e, e2e['error']
  assert e2e['epochs'] == 2 and e2e['epoch_time_s'] > 0 and e2e['images'] == 64
  # The priority order: the cells of the largest size and batch before the e2e epoch.
  order = [r['variant'] for r in records if r.get('kind') == 'measurement']
  assert order.index('e2e') > max(i for i, v in enumerate(order) if v == 'device')


@pytest.mark.slow
def test_the_dry_run_prints_the_table(dry_run):
  stdout, _ = dry_run
  assert 'ours host  ours device  torch eager  torch compile  ours/torch  MFU ours' in stdout
  assert [line for line in stdout.splitlines() if line.split()[:3] == ['96', '8', 'bfloat16']]
  assert 'e2e: 64 images 96px batch 8 float32 augmented: epoch 2' in stdout


def test_a_run_out_of_time_skips_every_measurement_and_still_reports(tmp_path):
  proc = _run(tmp_path, '--deadline_s=0', f'--out={tmp_path / "b.jsonl"}')
  assert proc.returncode == 0, proc.stderr
  measured = [r for r in bench_gpu.read_records(str(tmp_path / 'b.jsonl'))
              if r.get('kind') == 'measurement']
  assert len(measured) == 2 * 2 * 2 * 4 + 1  # sizes x batches x dtypes x variants + e2e
  assert all(r['skipped'] for r in measured)
  assert '256    256  bfloat16    skipped' in proc.stdout
  table = subprocess.run([sys.executable, '-m', 'experiments.bench_gpu',
                          f'--table_from={tmp_path / "b.jsonl"}'], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
  printed = proc.stdout[proc.stdout.index('train step, images/s'):].split('\nwrote ')[0]
  assert table.stdout.strip() == printed.strip()  # --table_from prints the same table
  assert '128     32   float32    skipped' in table.stdout


def test_an_unknown_framework_is_refused_before_measuring(tmp_path):
  proc = _run(tmp_path, '--frameworks=ours,jaxx', f'--out={tmp_path / "b.jsonl"}')
  assert proc.returncode != 0 and "unknown --frameworks or --parts ['jaxx']" in proc.stderr
  assert not (tmp_path / 'b.jsonl').exists()


@pytest.mark.skipif(HAS_TORCH, reason='checks what happens without torch')
def test_without_torch_its_cell_is_an_error_record(tmp_path):
  task = bench_gpu.Task('torch_compile', {'size': 96, 'batch': 8, 'dtype': 'float32'},
                        ('compile',))
  timing = {'rounds': 1, 'steps_per_round': 1, 'warmup_steps': 0, 'min_round_s': 0.0}
  records = bench_gpu.run_child(task, timing, 60, str(tmp_path / 'log'))
  assert [(r['framework'], r['variant']) for r in records] == [('torch', 'compile')]
  assert all("No module named 'torch'" in r['error'] for r in records)


def _settings(**kw):
  s = {'sizes': [256, 128], 'batches': [256, 32], 'dtypes': ['bfloat16', 'float32'],
       'frameworks': ['ours', 'torch', 'torch_compile'], 'parts': ['train_step', 'e2e'],
       'e2e_size': 256, 'e2e_dtype': 'float32', 'e2e_images': 9000, 'e2e_holdout': 1000,
       'e2e_batch': 0}
  return {**s, **kw}


def test_the_plan_runs_the_largest_cells_then_the_epoch_then_the_rest_then_compiles():
  names = [t.name for t in bench_gpu.plan(_settings())]
  assert names[:7] == [
      'ours 256px batch 256 bfloat16', 'torch 256px batch 256 bfloat16',
      'torch_compile 256px batch 256 bfloat16', 'ours 256px batch 256 float32',
      'torch 256px batch 256 float32', 'torch_compile 256px batch 256 float32',
      'e2e 256px batch auto float32']
  assert names[7:9] == ['ours 256px batch 32 bfloat16', 'torch 256px batch 32 bfloat16']
  assert len(names) == 2 * 2 * 2 * 3 + 1
  assert all(n.startswith('torch_compile') for n in names[-6:])
  assert [t.name for t in bench_gpu.plan(_settings(parts=['e2e']))] == names[6:7]


def test_the_epoch_runs_at_the_batch_where_ours_was_fastest():
  records = [{'framework': 'ours', 'variant': 'device', 'size': 256, 'batch': b,
              'images_per_s': ips} for b, ips in ((256, 900.0), (32, 1000.0))]
  assert bench_gpu.e2e_batch(_settings(), records) == 32
  assert bench_gpu.e2e_batch(_settings(), []) == 256
  assert bench_gpu.e2e_batch(_settings(e2e_batch=64), records) == 64


def test_mfu_is_three_forward_passes_over_the_dtype_peak():
  flops = {}
  ours = bench_gpu.add_mfu({'size': 256, 'dtype': 'bfloat16', 'device_kind': 'NVIDIA H200',
                            'images_per_s': 1e4, 'forward_flops_per_image': 2e9}, flops)
  assert ours['peak_tflops'] == 989.0
  assert ours['mfu'] == pytest.approx(3 * 2e9 * 1e4 / 989e12)
  # torch's records take ours' count at their size; float32 in TF32 is held to TF32's peak.
  torch = bench_gpu.add_mfu({'size': 256, 'dtype': 'float32', 'device_kind': 'NVIDIA H200',
                             'images_per_s': 1e4, 'f32_uses_tf32': True}, flops)
  assert torch['forward_flops_per_image'] == 2e9 and torch['peak_tflops'] == 494.0
  unknown = bench_gpu.add_mfu({'size': 256, 'dtype': 'float32', 'device_kind': 'NVIDIA H100 PCIe',
                               'images_per_s': 1e4}, flops)
  assert unknown['peak_precision'] == 'fp32' and unknown['mfu'] is None
