import time

import numpy as np
import pytest

from cnn import input_pipeline


def test_holdout_is_class_balanced_disjoint_and_seeded():
  labels = np.repeat(np.arange(4), [30, 50, 20, 40])
  train, held = input_pipeline.holdout_split(labels, 0.1, seed=0)
  assert np.intersect1d(train, held).size == 0
  assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(len(labels)))
  assert np.bincount(labels[held]).tolist() == [3, 5, 2, 4]
  same = input_pipeline.holdout_split(labels, 0.1, seed=0)[1]
  other = input_pipeline.holdout_split(labels, 0.1, seed=1)[1]
  assert np.array_equal(held, same) and not np.array_equal(held, other)


def test_load_dataset_splits_and_caches(tiny_config, tmp_path):
  tiny_config.cache_dir = str(tmp_path / 'cache')
  t0 = time.perf_counter()
  first = input_pipeline.load_dataset(tiny_config)
  first_s = time.perf_counter() - t0
  assert first.class_names == ['blue', 'green', 'red']
  assert first.train_images.shape == (54, 32, 32, 3) and first.train_images.dtype == np.uint8
  assert np.bincount(first.holdout_labels).tolist() == [2, 2, 2]
  # The test split is val/ exactly: every file, in order, with its folder's label.
  assert len(first.test_paths) == 18
  assert [p.split('/')[-2] for p in first.test_paths] == [
      first.class_names[y] for y in first.test_labels]
  # Pixels are the images' own colours: the red class is red, on average.
  red = first.train_images[first.train_labels == 2].astype(float).mean((0, 1, 2))
  assert red[0] > red[1] + 80 and red[0] > red[2] + 80

  cache_files = sorted(p for p in (tmp_path / 'cache').rglob('*') if p.is_file())
  mtimes = [p.stat().st_mtime_ns for p in cache_files]
  t0 = time.perf_counter()
  second = input_pipeline.load_dataset(tiny_config)
  assert time.perf_counter() - t0 < max(first_s, 5.0)
  assert [p.stat().st_mtime_ns for p in cache_files] == mtimes  # reused, not rebuilt
  # The build hands over the arrays it decoded; a later run reads the cache: the same data.
  for field in ('train_images', 'train_labels', 'holdout_images', 'holdout_labels',
                'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field), err_msg=field)
  assert first.test_paths == second.test_paths


def test_other_image_size_gets_its_own_cache(tiny_config, tmp_path):
  tiny_config.cache_dir = str(tmp_path / 'cache')
  a = input_pipeline.load_dataset(tiny_config)
  tiny_config.image_size = 24
  b = input_pipeline.load_dataset(tiny_config)
  assert a.train_images.shape[1:] == (32, 32, 3) and b.train_images.shape[1:] == (24, 24, 3)
  assert len(list((tmp_path / 'cache' / 'image_folder_cache').iterdir())) == 2


def test_batches_cover_each_epoch_once_and_depend_on_seed_and_epoch():
  images = np.arange(50).reshape(50, 1, 1, 1).astype(np.uint8)
  labels = np.arange(50, dtype=np.int32)
  epoch0 = list(input_pipeline.train_batches(images, labels, 8, seed=3, epoch=0))
  assert len(epoch0) == 6 and all(b['image'].shape == (8, 1, 1, 1) for b in epoch0)
  seen = np.concatenate([b['label'] for b in epoch0])
  assert len(set(seen)) == 48
  again = list(input_pipeline.train_batches(images, labels, 8, seed=3, epoch=0))
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(epoch0, again))
  epoch1 = list(input_pipeline.train_batches(images, labels, 8, seed=3, epoch=1))
  assert not np.array_equal(np.concatenate([b['label'] for b in epoch1]), seen)
  resumed = list(input_pipeline.train_batches(images, labels, 8, seed=3, epoch=0, start=4))
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(epoch0[4:], resumed))


def test_eval_batches_pad_and_mask():
  images = np.zeros((10, 2, 2, 3), np.uint8)
  batches = list(input_pipeline.eval_batches(images, np.arange(10, dtype=np.int32), 4))
  assert [b['image'].shape[0] for b in batches] == [4, 4, 4]
  assert sum(b['mask'].sum() for b in batches) == 10
  assert batches[-1]['mask'].tolist() == [1, 1, 0, 0]


@pytest.mark.slow
def test_real_photos_cache_full_resolution_jpegs(fullres_dir, tmp_path):
  img = input_pipeline.read_image(next((fullres_dir / 'train').rglob('*.jpg')), 128)
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and img.std() > 10
