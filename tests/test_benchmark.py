import pathlib
import subprocess
import sys

import numpy as np

from cnn import input_pipeline
from experiments import bench_measure
from experiments import bench_report
from tests.conftest import TINY_CLASSES, write_image_folder

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'benchmark.py'


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


def test_ratios_are_ours_over_each_other_framework_per_size():
  detail = {'128': {'ours': {'images_per_s': 60.0}, 'keras': {'images_per_s': 30.0},
                    'torch': {'error': 'ImportError: torch'}}}
  assert bench_report.ratios(detail, ['ours', 'keras', 'torch']) == {
      '128': {'ours_vs_keras': 2.0, 'ours_vs_torch': None}}


def test_the_script_runs_from_anywhere(tmp_path):
  """`python experiments/benchmark.py`, not only `python -m experiments.benchmark`."""
  proc = subprocess.run([sys.executable, str(SCRIPT), '--help'], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert 'Traceback' not in proc.stderr, proc.stderr  # was: No module named 'configs'
  assert proc.returncode in (0, 1)  # absl's --help exits 1 once the usage is printed
  assert '--parts' in proc.stdout


def test_the_script_names_an_unknown_framework_before_measuring(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), '--frameworks=ours,jaxx',
                         f'--out={tmp_path / "b.json"}'], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown --frameworks ['jaxx']" in proc.stderr
  assert not (tmp_path / 'b.json').exists()
