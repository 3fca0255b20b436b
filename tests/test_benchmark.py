"""The benchmarks: every part of the CPU benchmark and of the GPU benchmark's dry run runs at tiny
sizes and records a figure, or "skipped: not installed" where its framework is missing."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from cnn import input_pipeline
from experiments import bench_gpu
from experiments import bench_harness
from experiments import bench_measure
from tests.conftest import TINY_CLASSES, write_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU_SCRIPT = ROOT / 'experiments' / 'benchmark.py'
GPU_SCRIPT = ROOT / 'experiments' / 'bench_gpu.py'
FRAMEWORKS = ('ours', 'ours_bf16', 'flax_nn_conv', 'keras', 'torch')
# The smallest images the benchmarks' network takes: five VALID 3x3 convolutions and pools.
TINY = ['--sizes=96', '--batch_size=4', '--rounds=1', '--steps_per_round=1', '--e2e_size=96',
        '--e2e_epochs=2', f'--frameworks={",".join(FRAMEWORKS)}']


def _start(script: pathlib.Path, cwd: pathlib.Path, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
  stdout, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, stdout[-5000:]
  return stdout


def _figure_or_not_installed(record: dict, framework: str, key: str, where: str) -> None:
  if bench_harness.installed(framework):
    assert bench_harness.problem(record) is None, f'{where}: {bench_harness.problem(record)}'
    assert record[key] > 0, where
  else:
    assert record == {**record, 'skipped': 'not installed'}, where


def _check_cpu(out: dict, stdout: str) -> None:
  steps = out['train_step']['system']['96']
  assert list(steps) == list(FRAMEWORKS)
  for fw, r in steps.items():
    _figure_or_not_installed(r, fw, 'images_per_s', f'train step {fw}')
    if 'images_per_s' in r:
      assert r['compile_s'] >= 0 and len(r['wall_s']) == len(r['first_step_s']) == 1
      assert r['device_kind'] if fw in bench_measure.OURS else True
  for part, fw, key in (('input_pipeline', 'ours', 'cold_images_per_s'),
                        ('input_pipeline', 'keras', 'images_per_s'),
                        ('end_to_end', 'ours', 'wall_s'), ('end_to_end', 'keras', 'wall_s')):
    _figure_or_not_installed(out[part][fw], fw, key, f'{part} {fw}')
  assert out['end_to_end']['ours']['epochs'] == 2
  assert out['input_pipeline']['ours']['cached_images_per_s'] > 0
  missing = [fw for fw in FRAMEWORKS if not bench_harness.installed(fw)]
  assert all(p.endswith('skipped: not installed') and any(fw in p for fw in missing)
             for p in bench_harness.problems(out)), bench_harness.problems(out)
  assert ': error: ' not in stdout and 'train step, images/s' in stdout
  assert 'input pipeline, full-size photos to 96px' in stdout and 'end to end at 96px' in stdout


def _check_gpu(records: list[dict], stdout: str) -> None:
  assert records[0]['kind'] == 'run' and records[0]['dry_run'] and records[-1]['kind'] == 'done'
  measured = [r for r in records if r.get('kind') == 'measurement']
  assert [(r['framework'], r['variant']) for r in measured] == [
      ('ours', 'host'), ('ours', 'device'), ('torch', 'eager'), ('torch', 'compile'),
      ('ours', 'e2e')]  # the largest cell's before the e2e epoch
  for r in measured:
    where = f'{r["framework"]} {r["variant"]}'
    _figure_or_not_installed(r, r['framework'], 'images_per_s', where)
    if r['framework'] == 'ours':
      assert r['forward_flops_per_image'] > 0 and r['mfu'] is None  # the CPU has no peak
  e2e = measured[-1]
  assert e2e['epochs'] == 2 and e2e['epoch_time_s'] > 0 and e2e['images'] == 64
  assert 'ours host  ours device  torch eager  torch compile  ours/torch  MFU ours' in stdout
  assert 'e2e: 64 images 96px batch 8 float32 augmented: epoch 2' in stdout


def _check_compare(out: dict, stdout: str) -> None:
  """This checkout against itself, as --compare_with times another."""
  steps = out['train_step']['system']['96']
  assert list(steps) == ['ours', f'ours@{ROOT.name}']
  assert all(r['images_per_s'] > 0 and r['cnn'] == str(ROOT / 'cnn') for r in steps.values())
  assert f'ours/ours@{ROOT.name}' in stdout


def test_every_part_records_a_figure_at_tiny_sizes(tmp_path):
  """Both benchmarks at once, each part in its own processes, as `python experiments/...`
  from another folder; a part whose framework is not installed says so."""
  data = write_image_folder(tmp_path / 'data', {'train': 12, 'val': 2})
  photos = write_image_folder(tmp_path / 'photos', {'train': 3}, size=120)
  cpu = _start(CPU_SCRIPT, tmp_path, *TINY, f'--data_dir={data}', f'--fullres_dir={photos}',
               f'--out={tmp_path / "cpu.json"}')
  gpu = _start(GPU_SCRIPT, tmp_path, '--dry_run', f'--out={tmp_path / "gpu.jsonl"}')
  gpu_out = _finish(gpu)  # then the comparison, beside the CPU benchmark's longer run
  compare = _start(CPU_SCRIPT, tmp_path, '--parts=train_step', '--sizes=96', '--batch_size=4',
                   '--rounds=1', f'--compare_with={ROOT}', f'--out={tmp_path / "compare.json"}')
  cpu_out, compare_out = _finish(cpu), _finish(compare)
  _check_cpu(json.loads((tmp_path / 'cpu.json').read_text()), cpu_out)
  _check_gpu(bench_gpu.read_records(str(tmp_path / 'gpu.jsonl')), gpu_out)
  _check_compare(json.loads((tmp_path / 'compare.json').read_text()), compare_out)


class _FakeChild:
  """bench_harness.Child without a process: a step worker whose steps take 1 s each."""
  started, sent = [], []

  def __init__(self, measure, args, log_path, env=None, tree=''):
    del measure, log_path, env
    self.started.append((args['framework'], tree))
    self.replies = [{'first_step_s': 3.0, 'warm_step_s': 1.0, 'device_kind': 'cpu'}]

  def send(self, steps):
    self.sent.append(steps)
    self.replies.append({'wall_s': 1.0, 'cpu_s': 2.0})

  def recv(self, timeout=None):
    del timeout
    return self.replies.pop(0)

  def close(self):
    pass


def test_rounds_alternate_their_order_and_fresh_starts_a_child_each_round(monkeypatch):
  monkeypatch.setattr(bench_harness, 'Child', _FakeChild)
  timing = {'rounds': 3, 'steps_per_round': 2, 'warmup_steps': 1, 'min_round_s': 5.0}
  for fresh, trees in ((False, ['', 'x']), (True, ['', 'x', 'x', '', '', 'x'])):
    _FakeChild.started, _FakeChild.sent = [], []
    workers = {name: bench_harness.StepWorker({'framework': 'ours', 'batch': 4}, lambda: '',
                                              tree=tree) for name, tree in (('a', ''), ('b', 'x'))}
    out = bench_harness.time_steps(workers, timing, fresh=fresh)
    assert [tree for _, tree in _FakeChild.started] == trees
    assert _FakeChild.sent == [5] * 6  # min_round_s of 1 s steps, more than steps_per_round
    assert out['a']['images_per_s'] == 4.0 and out['a']['compile_s'] == 2.0
    assert out['b']['wall_s'] == [1.0, 1.0, 1.0] and out['b']['device_kind'] == 'cpu'


def test_a_framework_that_is_not_installed_is_skipped_not_an_error(tmp_path, monkeypatch):
  monkeypatch.setitem(bench_harness.NEEDS, 'torch', ('no_such_module_anywhere',))
  assert bench_harness.run_once('step_worker', {'framework': 'torch'}, str(tmp_path / 'log')) == [
      {'skipped': 'not installed'}]
  task = bench_gpu.Task('torch_compile', {'size': 96, 'batch': 8, 'dtype': 'float32'},
                        ('compile',))
  settings = {'rounds': 1, 'steps_per_round': 1, 'warmup_steps': 0, 'min_round_s': 0.0,
              'torch_compile_backend': 'inductor'}
  records = bench_gpu.run_child(task, settings, 60, bench_harness.log_paths(str(tmp_path / 'logs')))
  assert [(r['framework'], r['variant'], r['skipped']) for r in records] == [
      ('torch', 'compile', 'not installed')]
  assert not (tmp_path / 'log').exists() and not os.listdir(tmp_path / 'logs')  # no process


def test_a_failing_measurement_is_an_error_record_with_its_reason(tmp_path):
  records = bench_harness.run_once('step_worker', {'framework': 'jaxx'}, str(tmp_path / 'log'))
  assert records == [{'error': "KeyError: 'jaxx'"}]
  assert 'Traceback' in (tmp_path / 'log').read_text()  # the child's output is in its log


def test_problems_name_every_record_without_a_figure():
  out = {'train_step': {'system': {'128': {'ours': {'images_per_s': 60.0},
                                           'keras': {'error': 'ImportError: x'},
                                           'torch': {'skipped': 'not installed'}}}}}
  assert bench_harness.problems(out) == ['train_step system 128 keras: error: ImportError: x',
                                         'train_step system 128 torch: skipped: not installed']


def test_fullres_folder_is_a_dataset_of_all_photos_plus_one_test_image_a_class(tmp_path):
  src = write_image_folder(tmp_path / 'photos', {'train': 5})
  root = bench_measure.fullres_folder(str(src), str(tmp_path / 'bench'))
  splits, classes = input_pipeline.discover(root)
  assert classes == sorted(TINY_CLASSES)
  train = sorted(pathlib.Path(p).resolve() for p in splits['train'].paths)
  assert train == sorted(p.resolve() for p in (src / 'train').rglob('*') if p.is_file())
  assert np.bincount(splits['val'].labels).tolist() == [1, 1, 1]
  # The photos are linked, never copied.
  assert all(pathlib.Path(root, 'train', c).is_symlink() for c in TINY_CLASSES)


def test_the_script_names_an_unknown_framework_before_measuring(tmp_path):
  proc = subprocess.run([sys.executable, str(CPU_SCRIPT), '--frameworks=ours,jaxx',
                         f'--out={tmp_path / "b.json"}'], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown --frameworks ['jaxx']" in proc.stderr
  assert not (tmp_path / 'b.json').exists()
