"""Stand-in datasets: a seeded share of train/ per class, or the first classes, as links."""

import os

import pytest

from cnn import input_pipeline
from experiments import make_standin


def test_a_train_fraction_keeps_a_seeded_share_per_class_and_the_whole_test_split(
    tiny_data_dir, tmp_path):
  counts = make_standin.make_standin(str(tiny_data_dir), str(tmp_path / 'a'), train_fraction=0.3)
  classes = sorted(os.listdir(tiny_data_dir / 'train'))
  assert counts == {'train': 6 * len(classes), 'val': 6 * len(classes)}
  for name in classes:
    kept = sorted(os.listdir(tmp_path / 'a' / 'train' / name))
    assert len(kept) == 6 and set(kept) <= set(os.listdir(tiny_data_dir / 'train' / name))
    link = tmp_path / 'a' / 'train' / name / kept[0]
    assert os.path.islink(link) and link.read_bytes() == (tiny_data_dir / 'train' / name /
                                                          kept[0]).read_bytes()
  make_standin.make_standin(str(tiny_data_dir), str(tmp_path / 'b'), train_fraction=0.3)
  assert all(os.listdir(tmp_path / 'a' / 'train' / n) == os.listdir(tmp_path / 'b' / 'train' / n)
             for n in classes)
  # The loader reads the linked folder as it reads any other.
  splits, class_names = input_pipeline.discover(str(tmp_path / 'a'))
  assert class_names == classes and len(splits['train'].paths) == 6 * len(classes)


def test_num_classes_keeps_the_first_classes_and_an_existing_dst_is_refused(tiny_data_dir,
                                                                           tmp_path):
  make_standin.make_standin(str(tiny_data_dir), str(tmp_path / 'c'), num_classes=2)
  first_two = sorted(os.listdir(tiny_data_dir / 'train'))[:2]
  assert sorted(os.listdir(tmp_path / 'c' / 'train')) == first_two
  assert sorted(os.listdir(tmp_path / 'c' / 'val')) == first_two
  with pytest.raises(SystemExit, match='exists'):
    make_standin.make_standin(str(tiny_data_dir), str(tmp_path / 'c'), num_classes=2)
