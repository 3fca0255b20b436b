import pathlib

import numpy as np

from cnn import input_pipeline
from experiments import benchmark
from tests.conftest import TINY_CLASSES, write_image_folder


def test_fullres_folder_is_a_dataset_of_all_photos_plus_one_test_image_a_class(tmp_path):
  src = write_image_folder(tmp_path / 'photos', {'train': 5})
  root = benchmark.fullres_folder(str(src), str(tmp_path / 'bench'))
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
  assert benchmark._ratios(detail, ['ours', 'keras', 'torch']) == {
      '128': {'ours_vs_keras': 2.0, 'ours_vs_torch': None}}
