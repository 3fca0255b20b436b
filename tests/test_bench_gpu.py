"""experiments/bench_gpu.py: the deadline, the plan's order, MFU (its dry run on the CPU is in
tests/test_benchmark.py)."""

import pathlib
import subprocess
import sys

import pytest

from experiments import bench_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'experiments' / 'bench_gpu.py'


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)


def test_a_run_out_of_time_skips_every_measurement_and_still_reports(tmp_path):
  proc = _run(tmp_path, '--deadline_s=0', f'--out={tmp_path / "b.jsonl"}')
  assert proc.returncode == 0, proc.stderr
  measured = [r for r in bench_gpu.read_records(str(tmp_path / 'b.jsonl'))
              if r.get('kind') == 'measurement']
  assert len(measured) == 2 * 2 * 2 * 4 + 1  # sizes x batches x dtypes x variants + e2e
  assert all(r['skipped'].endswith('s left before the deadline') for r in measured)
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
