import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from cnn import errors
from cnn import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
ARRAYS = ('train_images', 'train_labels', 'holdout_images', 'holdout_labels', 'test_images',
          'test_labels')
# A sitecustomize that makes TensorFlow look uninstalled: the path finder stops seeing it, so
# `import tensorflow` fails and importlib.util.find_spec('tensorflow') is None, as without it.
NO_TENSORFLOW = '''
import importlib.machinery
import sys


class _Hide:

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.partition('.')[0] == 'tensorflow':
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self._finder, name)


sys.meta_path[:] = [_Hide(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''
# Run first in every script: the blocker really blocks, and the config comes from the test.
PRELUDE = '''
import importlib.util, json, sys
assert importlib.util.find_spec('tensorflow') is None
try:
  import tensorflow
  raise AssertionError('tensorflow was imported')
except ModuleNotFoundError:
  pass
import numpy as np
from configs import default
config = default.get_config()
config.update(json.loads(sys.argv[1]))
'''


def _run_without_tensorflow(tmp_path: pathlib.Path, script: str, config) -> str:
  """Runs `script` after PRELUDE in a Python that cannot import TensorFlow; returns stdout."""
  blocker = tmp_path / 'no_tensorflow'
  blocker.mkdir(exist_ok=True)
  (blocker / 'sitecustomize.py').write_text(NO_TENSORFLOW)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
  run = subprocess.run([sys.executable, '-c', PRELUDE + script, json.dumps(config.to_dict())],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


def _cache_files(root: pathlib.Path) -> dict[str, int]:
  """Modification times of the cache's files (the lock file beside them is not the cache)."""
  return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob('*'))
          if p.is_file() and p.suffix != '.lock'}


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
  for field in ARRAYS:
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field), err_msg=field)
  assert first.test_paths == second.test_paths


def test_other_image_size_gets_its_own_cache(tiny_config, tmp_path):
  tiny_config.cache_dir = str(tmp_path / 'cache')
  a = input_pipeline.load_dataset(tiny_config)
  tiny_config.image_size = 24
  b = input_pipeline.load_dataset(tiny_config)
  assert a.train_images.shape[1:] == (32, 32, 3) and b.train_images.shape[1:] == (24, 24, 3)
  assert len(list((tmp_path / 'cache' / 'image_folder_cache').iterdir())) == 2


def test_without_tensorflow_train_imports_and_a_cache_reads(tiny_config, tmp_path):
  tiny_config.cache_dir = str(tmp_path / 'cache')
  built = input_pipeline.load_dataset(tiny_config)  # here, where TensorFlow is importable
  np.savez(tmp_path / 'built.npz', **{f: getattr(built, f) for f in ARRAYS})
  files = _cache_files(tmp_path / 'cache')
  out = _run_without_tensorflow(tmp_path, '''
import cnn.runs  # (a): training imports input_pipeline and download
from cnn import input_pipeline
ds = input_pipeline.load_dataset(config)  # (b)
built = np.load('built.npz')
for field in built.files:
  np.testing.assert_array_equal(getattr(ds, field), built[field], err_msg=field)
assert 'tensorflow' not in sys.modules
print('read', len(ds.train_labels), 'training images')
''', tiny_config)
  assert out.splitlines() == [f'read {len(built.train_labels)} training images']  # no rebuild
  assert _cache_files(tmp_path / 'cache') == files


def test_without_tensorflow_trains_from_arrays_in_memory(tiny_config, tmp_path):
  # (c) Training from arrays in memory; data_dir stays a real folder, should training check it.
  tiny_config.update(image_size=16, num_epochs=1, cache_dir=str(tmp_path / 'unused_cache'))
  out = _run_without_tensorflow(tmp_path, '''
import cnn.runs
from cnn import input_pipeline
rng = np.random.default_rng(0)
images = lambda n: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
labels = lambda n: np.arange(n, dtype=np.int32) % 3
data = input_pipeline.Dataset(
    train_images=images(24), train_labels=labels(24), holdout_images=images(6),
    holdout_labels=labels(6), test_images=images(6), test_labels=labels(6),
    test_paths=[f'val/{i}.png' for i in range(6)], class_names=['a', 'b', 'c'], skipped=[])
summary = cnn.runs.train_and_evaluate(config, 'run', data=data)
assert 'tensorflow' not in sys.modules
print('epochs run', summary['epochs_run'])
''', tiny_config)
  assert out.splitlines()[-1] == 'epochs run 1'


def _cache_folder(config) -> pathlib.Path:
  """Where the versions of `config`'s cache live: cache_dir/image_folder_cache/<name>."""
  splits, class_names = input_pipeline.discover(config.data_dir)
  name = input_pipeline.cache_name(config, splits, class_names)
  return pathlib.Path(config.cache_dir) / 'image_folder_cache' / name


def test_a_cache_of_an_older_version_is_rebuilt_with_one_line(tiny_config, tmp_path, capsys):
  tiny_config.cache_dir = str(tmp_path / 'fresh')
  fresh = input_pipeline.load_dataset(tiny_config)
  tiny_config.cache_dir = str(tmp_path / 'cache')
  folder = _cache_folder(tiny_config)
  old = folder / '2.0.0'  # an older version's cache (TFRecord files), in outline
  old.mkdir(parents=True)
  (old / 'dataset_info.json').write_text('{"name": "image_folder_cache", "version": "2.0.0"}')
  (old / 'image_folder_cache-train.tfrecord-00000-of-00001').write_bytes(b'old records')
  capsys.readouterr()
  loaded = input_pipeline.load_dataset(tiny_config)
  out = capsys.readouterr().out.splitlines()
  assert [line for line in out if 'older version' in line] == [
      f'rebuilding the image cache in {folder}: it was written by an older version (2.0.0), '
      'whose files are replaced']
  assert not old.exists() and sorted(p.name for p in folder.iterdir()) == ['3.0.0']
  for field in ARRAYS:
    np.testing.assert_array_equal(getattr(loaded, field), getattr(fresh, field), err_msg=field)
  input_pipeline.load_dataset(tiny_config)  # from the new cache: neither rebuilt nor announced
  assert capsys.readouterr().out == ''


def test_a_killed_builds_leftovers_are_removed_not_read(tiny_config, tmp_path):
  tiny_config.cache_dir = str(tmp_path / 'cache')
  folder = _cache_folder(tiny_config)
  leftover = folder / 'incomplete.K1LLED_3.0.0'  # TFDS's temporary folder of the build
  leftover.mkdir(parents=True)
  (leftover / 'image_folder_cache-train.array_record-00000-of-00001').write_bytes(b'half')
  data = input_pipeline.load_dataset(tiny_config)
  assert len(data.train_images) + len(data.holdout_images) == 60
  assert sorted(p.name for p in folder.iterdir()) == ['3.0.0']


def test_a_full_disk_stops_the_build_with_one_error_and_no_cache(tiny_config, small_disk):
  """On a 1 MiB disk the build fails with DiskFullError and leaves no cache; grown to 16 MiB,
  the same call builds the cache."""
  if small_disk is None:
    return  # it ran, and passed, in a user namespace of its own (the fixture says why)
  tiny_config.image_size = 128  # 78 images, 3.7 MiB of arrays: more than the 1 MiB disk holds
  disk = small_disk.path
  tiny_config.cache_dir = str(disk)
  with pytest.raises(errors.DiskFullError) as e:
    input_pipeline.load_dataset(tiny_config)
  message = str(e.value)
  assert message.startswith(f'no space left on the disk of {disk}: '), message
  assert ' MiB free, about ' in message and ' MiB needed; ' in message, message
  assert 'no cache was written; the image folder is untouched' in message, message
  assert errors.is_disk_full(e.value.__cause__)
  assert list(disk.glob('image_folder_cache/*/*')) == []  # no version folder, no incomplete.*
  small_disk.resize('16m')
  data = input_pipeline.load_dataset(tiny_config)
  assert data.train_images.shape[1:] == (128, 128, 3) and len(data.test_labels) == 18


def test_building_a_cache_leaves_no_temporary_folder(tiny_config, tmp_path, monkeypatch):
  scratch = tmp_path / 'scratch'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))  # where mkdtemp() would leave one
  tiny_config.cache_dir = str(tmp_path / 'cache')
  data = input_pipeline.load_dataset(tiny_config)
  assert len(data.train_images) + len(data.holdout_images) > 0
  assert list(scratch.iterdir()) == []


def test_batches_cover_each_epoch_once_and_depend_on_seed_and_epoch():
  epoch0 = list(input_pipeline.batch_indices(50, 8, seed=3, epoch=0))
  assert len(epoch0) == 6 and all(b.shape == (8,) for b in epoch0)
  seen = np.concatenate(epoch0)
  assert len(set(seen)) == 48
  again = list(input_pipeline.batch_indices(50, 8, seed=3, epoch=0))
  assert all(np.array_equal(a, b) for a, b in zip(epoch0, again))
  epoch1 = list(input_pipeline.batch_indices(50, 8, seed=3, epoch=1))
  assert not np.array_equal(np.concatenate(epoch1), seen)
  resumed = list(input_pipeline.batch_indices(50, 8, seed=3, epoch=0, start=4))
  assert all(np.array_equal(a, b) for a, b in zip(epoch0[4:], resumed))


@pytest.mark.slow
def test_real_photos_cache_full_resolution_jpegs(fullres_dir, tmp_path):
  img = input_pipeline.read_image(next((fullres_dir / 'train').rglob('*.jpg')), 128)
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and img.std() > 10
