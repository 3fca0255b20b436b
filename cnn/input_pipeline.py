"""Discover, split and cache the image folders; serve shuffled numpy batches.

    data_dir/train/<class>/*  -> train + class-balanced hold-out (validation)
    data_dir/val/<class>/*    -> test set, never seen by training

Every image is decoded and resized once into a tensorflow-datasets cache of uint8 arrays, keyed
by the folder's contents and the image size; later runs read the arrays back. The format is
array_record, which TFDS writes and reads back (`builder.as_data_source()`) without TensorFlow.
A cache of an older version is rebuilt in its place. tensorflow_datasets is imported on first
use: training from arrays already in memory needs none of it.
"""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Iterator
import warnings

from absl import logging

import numpy as np
import tqdm
from PIL import Image
from PIL import UnidentifiedImageError

from cnn import errors

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
# Formats read_image reads, told apart by content so a wrong or missing suffix is harmless.
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM')
SPLITS = ('train', 'val')


# Unreadable files named one per line; the rest are counted (summary.json lists them all).
WARNINGS_SHOWN = 5
_VERSION = '3.0.0'  # array_record; older versions' caches are rebuilt
_DECODER_MODULES = r'PIL\.'


class DatasetError(errors.UserError, ValueError):
  """The data folder cannot be used; the message says what to fix."""


class ImageReadError(ValueError):
  """One file could not be decoded as an image."""


@dataclasses.dataclass
class Dataset:
  train_images: np.ndarray  # (N, S, S, 3) uint8
  train_labels: np.ndarray  # (N,) int32
  holdout_images: np.ndarray
  holdout_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_paths: list[str]
  class_names: list[str]
  skipped: list[str]  # files that look like images but could not be decoded


@dataclasses.dataclass
class FileList:
  paths: list[str]
  labels: list[int]


def _looks_like_image(path: pathlib.Path) -> bool:
  with open(path, 'rb') as f:
    head = f.read(12)
  return head.startswith(_MAGIC) or (head[:4] == b'RIFF' and head[8:] == b'WEBP')


def _list_class(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files of one class folder: by suffix or by content; hidden and other files ignored."""
  files = []
  for p in sorted(folder.rglob('*')):
    if not p.is_file() or p.name.startswith('.'):
      continue
    if p.suffix.lower() in IMAGE_SUFFIXES or _looks_like_image(p):
      files.append(p)
  return files


def discover(data_dir: str) -> tuple[dict[str, FileList], list[str]]:
  """Files and labels of each split; class names are train/'s sub-folder names, sorted."""
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise DatasetError(f'data_dir {data_dir!r} does not exist. Put the data there (it must hold '
                       'train/<class>/ and val/<class>/) or point at it with '
                       '--config.data_dir=PATH')
  for split in SPLITS:
    if not (root / split).is_dir():
      raise DatasetError(f'{root / split} is missing: data_dir must hold train/<class>/ and '
                         'val/<class>/ (for iNaturalist 12K that is the inaturalist_12K folder)')
  classes = {s: sorted(d.name for d in (root / s).iterdir()
                       if d.is_dir() and not d.name.startswith('.')) for s in SPLITS}
  if not classes['train']:
    raise DatasetError(f'{root / "train"} has no class folders; expected train/<class>/*.jpg')
  if classes['train'] != classes['val']:
    only_train = sorted(set(classes['train']) - set(classes['val']))
    only_val = sorted(set(classes['val']) - set(classes['train']))
    raise DatasetError(f'class folders differ between train/ and val/: only in train: '
                       f'{only_train}, only in val: {only_val}. Both splits need the same classes')
  splits = {}
  for split in SPLITS:
    files = FileList([], [])
    for label, name in enumerate(classes['train']):
      found = _list_class(root / split / name)
      if not found:
        raise DatasetError(f'class folder {root / split / name} holds no images; add images or '
                           'remove the folder from both splits')
      files.paths += [str(p) for p in found]
      files.labels += [label] * len(found)
    splits[split] = files
  return splits, classes['train']


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (train, holdout): `fraction` of every class, at least one, drawn with `seed`."""
  rng = np.random.default_rng(seed)
  train, held = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
    held.append(idx[:n])
    train.append(idx[n:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def read_image(path: str, image_size: int) -> np.ndarray:
  """One file -> (S, S, 3) uint8, antialiased bilinear; ImageReadError says which file and why.

  A JPEG whose short side keeps image_size pixels at 1/2, 1/4 or 1/8 scale is decoded at that
  scale in the DCT (PIL's draft mode). PIL releases the GIL, so threads decode in parallel.
  """
  _hide_decoder_warnings()
  try:
    with Image.open(path) as im:
      im.draft('RGB', (image_size, image_size))
      rgb = im.convert('RGB')  # grey, palette, CMYK, alpha: all to RGB; reads the pixels
      return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR,
                                   reducing_gap=None))
  except Exception as e:  # pylint: disable=broad-except
    # Mostly OSError, but malformed files can raise struct.error, EOFError, IndexError, ...
    raise ImageReadError(f'{path}: not a readable image ({_reason(path, e)})') from None


def _hide_decoder_warnings() -> None:
  """Keeps PIL's warnings (a palette PNG with transparency, ...) off the screen: a process-wide
  filter, as catch_warnings is not thread-safe before Python 3.14; re-added when something (pytest)
  resets the filters."""
  for action, _, _, module, _ in warnings.filters:
    if action == 'ignore' and module is not None and module.pattern == _DECODER_MODULES:
      return
  warnings.filterwarnings('ignore', module=_DECODER_MODULES)


def _reason(path: str, error: Exception) -> str:
  if isinstance(error, UnidentifiedImageError):  # its message repeats the path
    empty = os.path.getsize(path) == 0
    return 'the file is empty' if empty else 'not a JPEG, PNG, GIF, BMP or WebP image'
  return str(error) or type(error).__name__


@functools.cache
def _builder_class() -> type:
  """The TFDS builder class, defined on first use so that importing this module needs no TFDS."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # its bars for the write are noise; load_dataset says what it does

  class ImageFolderCache(tfds.core.GeneratorBasedBuilder):
    """Decoded, resized uint8 images of one image folder at one size, as a TFDS dataset."""

    VERSION = tfds.core.Version(_VERSION)

    def __init__(self, *, splits: dict[str, FileList], class_names: list[str],
                 image_size: int, name: str, **kwargs):
      self._splits, self._class_names, self._image_size = splits, class_names, image_size
      self.decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # (images, indices) built
      self.reasons: dict[str, str] = {}  # why each file a build skipped could not be read
      super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _info(self):
      s = self._image_size
      info = self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES),
          'label': tfds.features.ClassLabel(names=self._class_names),
          'index': np.int64,  # position in discover()'s file list: load_dataset sorts by it
      }), disable_shuffling=True)  # a shuffle on write that load_dataset would undo
      # For a cache not yet built, TFDS looks for a public dataset's metadata on GCS in a
      # mkdtemp() folder it never removes; a local cache has no such metadata.
      info.initialize_from_bucket = lambda: None
      return info

    # TFDS prints "Downloading and preparing dataset ..." and "... prepared"; we print our own.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      # load_dataset takes these instead of reading back the files just written.
      self.decoded[split] = yield from _decode_split(self._splits[split], self._image_size,
                                                     self.reasons)

  return ImageFolderCache


def _decode_split(files: FileList, size: int, reasons: dict[str, str]):
  """Yields the examples of one split, decoded in threads; returns (images, indices) kept.
  Why each skipped file could not be read goes into `reasons`."""

  def decode(i):
    try:
      return i, read_image(files.paths[i], size)
    except ImageReadError as e:
      return i, e  # load_dataset names it, on this run and on every run using the cache

  kept, images = [], np.empty((len(files.paths), size, size, 3), np.uint8)
  # A bar on a terminal only: an iNaturalist-size build takes minutes; logs get the one line.
  bar = tqdm.tqdm(total=len(files.paths), unit='img', desc='decoding', leave=False,
                  disable=not sys.stderr.isatty())
  # Two per core: while one thread reads a file or converts a result, the other decodes.
  with bar, concurrent.futures.ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
    for i, img in pool.map(decode, range(len(files.paths))):
      bar.update()
      if isinstance(img, ImageReadError):
        reasons[files.paths[i]] = str(img)
        continue
      kept.append(i)
      images[i] = img
      yield i, {'image': img, 'label': files.labels[i], 'index': i}
  return (images if len(kept) == len(images) else images[kept]), np.array(kept, np.int64)


def cache_name(config, splits: dict[str, FileList], class_names: list[str]) -> str:
  """The cache's TFDS config name: the folder's name, the image size and a hash of the files'
  names, labels, sizes and modification times."""
  content = hashlib.sha256(repr(class_names).encode())
  for split in SPLITS:
    for p, y in zip(splits[split].paths, splits[split].labels):
      st = os.stat(p)
      content.update(
          f'{split}|{os.path.basename(p)}|{y}|{st.st_size}|{int(st.st_mtime)}\n'.encode())
  folder = pathlib.Path(config.data_dir).resolve().name
  return f'{folder}_{config.image_size}px_{content.hexdigest()[:12]}'


def user_cache_root() -> pathlib.Path:
  """$XDG_CACHE_HOME/inat_cnn (~/.cache/inat_cnn): the image cache and XLA's compilation cache."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'inat_cnn'


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS warns about every custom config and deprecated field: noise for our users."""
  old = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(old)


def _prepared_builder(splits, class_names, image_size, name, root):
  """The builder of this folder's cache (array_record files under root/image_folder_cache/name),
  built first where it is missing. Called under the lock: a builder made earlier would not see
  splits another process wrote.

  TFDS writes into an incomplete.* folder beside the version's folder and renames it when done,
  removing it when the write fails: a failed build (DiskFullError where the disk fills up)
  leaves nothing that reads as a cache.
  """
  builder = _builder_class()(splits=splits, class_names=class_names, image_size=image_size,
                             name=name, data_dir=str(root), version=_VERSION,
                             file_format='array_record')
  if builder.is_prepared():
    return builder
  _remove_leftovers(pathlib.Path(builder.data_dir).parent)
  n = sum(len(s.paths) for s in splits.values())
  t = time.perf_counter()
  print(f'decoding {n} images once into {root} ...', flush=True)
  with errors.disk_full_guard(str(root), n * image_size * image_size * 3,
                              'no cache was written; the image folder is untouched'):
    builder.download_and_prepare()
  t = time.perf_counter() - t
  print(f'cache built: {n} images in {t:.1f} s ({n / t:.0f} images/s)', flush=True)
  return builder


def _remove_leftovers(folder: pathlib.Path) -> None:
  """Removes what a killed build left in `folder` (nobody else uses it under the lock) and the
  caches of older versions, which this version does not read, saying so in one line."""
  if not folder.is_dir():
    return
  for stale in folder.glob('incomplete.*'):
    shutil.rmtree(stale, ignore_errors=True)
  older = sorted(d.name for d in folder.iterdir() if d.is_dir() and _is_older_version(d.name))
  if older:
    print(f'rebuilding the image cache in {folder}: it was written by an older version '
          f'({", ".join(older)}), whose files are replaced', flush=True)
  for version in older:
    shutil.rmtree(folder / version, ignore_errors=True)


def _is_older_version(name: str) -> bool:
  """True for a version folder's name (like 2.0.0) older than _VERSION."""
  as_tuple = lambda v: tuple(int(x) for x in v.split('.'))
  return re.fullmatch(r'\d+\.\d+\.\d+', name) is not None and as_tuple(name) < as_tuple(_VERSION)


def _read_split(builder, split: str, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(images, indices into discover()'s file list) of one split of a prepared cache: what the
  build decoded, else the records read back chunk by chunk into one array."""
  if split in builder.decoded:
    return builder.decoded[split]
  source = builder.as_data_source(split=split)
  n = len(source)
  images = np.empty((n, *builder.info.features['image'].shape), np.uint8)
  index = np.empty(n, np.int64)
  for start in range(0, n, chunk):
    for i, record in enumerate(source.__getitems__(range(start, min(n, start + chunk))), start):
      images[i], index[i] = record['image'], record['index']
  order = np.argsort(index, kind='stable')
  return images[order], index[order]


def _why(reasons: dict[str, str], image_size: int, path: str) -> str:
  if path in reasons:
    return reasons[path]
  try:
    read_image(path, image_size)  # again, for the reason: the cache does not keep it
    return f'{path}: unreadable when the cache was built'
  except ImageReadError as e:
    return str(e)


def load_dataset(config) -> Dataset:
  """Train/hold-out/test arrays at `config.image_size`, building the cache on first use."""
  splits, class_names = discover(config.data_dir)
  name = cache_name(config, splits, class_names)
  root = pathlib.Path(config.cache_dir) if config.cache_dir else user_cache_root()
  root.mkdir(parents=True, exist_ok=True)
  # The lock makes concurrent sweep runs build once and share the result.
  with open(root / f'{name}.lock', 'a') as lock, _quiet_tfds():
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    builder = _prepared_builder(splits, class_names, config.image_size, name, root)

  with _quiet_tfds():
    train_all, train_idx = _read_split(builder, 'train')
    test_images, test_idx = _read_split(builder, 'val')
  train_files, test_files = splits['train'], splits['val']
  skipped = sorted(set(train_files.paths) - {train_files.paths[i] for i in train_idx}
                   | set(test_files.paths) - {test_files.paths[i] for i in test_idx})
  why = functools.partial(_why, builder.reasons, config.image_size)
  for path in skipped[:WARNINGS_SHOWN]:  # the first few by name; summary.json lists them all
    print(f'warning: skipping unreadable image {why(path)}', file=sys.stderr, flush=True)
  if len(skipped) > WARNINGS_SHOWN:
    print(f'warning: ... and {len(skipped) - WARNINGS_SHOWN} more unreadable images; all are '
          'listed in summary.json', file=sys.stderr, flush=True)
  for split, files, kept in (('train', train_files, train_idx), ('val', test_files, test_idx)):
    readable = np.bincount(np.asarray(files.labels)[kept], minlength=len(class_names))
    for c in np.flatnonzero(readable == 0):  # a class none of whose files decoded
      bad = [p for p, y in zip(files.paths, files.labels) if y == c]
      raise DatasetError(
          f'class folder {pathlib.Path(config.data_dir) / split / class_names[c]} has no readable '
          f'images: all {len(bad)} of its image files failed to decode (first: {why(bad[0])}); '
          'replace them, or remove the class folder from both splits')
  labels = np.asarray(train_files.labels, np.int32)[train_idx]
  keep, held = holdout_split(labels, config.holdout_fraction, config.seed)
  return Dataset(
      train_images=train_all[keep], train_labels=labels[keep],
      holdout_images=train_all[held], holdout_labels=labels[held],
      test_images=test_images,
      test_labels=np.asarray(test_files.labels, np.int32)[test_idx],
      test_paths=[test_files.paths[i] for i in test_idx],
      class_names=class_names, skipped=skipped)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[np.ndarray]:
  """Each full batch of epoch `epoch` from batch `start` on, a pure function of (seed, epoch);
  the remainder waits a reshuffle."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)  # resumed runs repeat the order
  for i in range(start, n // batch_size):
    yield np.sort(perm[i * batch_size:(i + 1) * batch_size])  # sorted: a faster gather
