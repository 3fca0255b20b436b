"""Discover, split and cache the image folders; serve shuffled numpy batches.

    data_dir/train/<class>/*  -> train + class-balanced hold-out (validation)
    data_dir/val/<class>/*    -> test set, never seen by training

Every image is decoded and resized once into a tensorflow-datasets cache of uint8 arrays keyed
by the folder's contents and the image size; later runs load the arrays in seconds.
"""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil
import sys
import time
from typing import Iterator

from absl import logging

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

# TensorFlow's C++ INFO/WARNING logs (buffer sizes, ...) are not for our users. Its CUDA probe
# lines at import come before its logger starts and cannot be silenced.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds

# TensorFlow only reads and writes the cache here: keep it off the accelerators JAX uses.
tf.config.set_visible_devices([], 'GPU')
# Its bars for an internal shuffle and write are noise; load_dataset says what it does.
tfds.disable_progress_bar()

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
# Formats read_image reads, told apart by content so a wrong or missing suffix is harmless.
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM')
SPLITS = ('train', 'val')


class DatasetError(ValueError):
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
                       'train/<class>/ and val/<class>/) or point at it with --config.data_dir=PATH')
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
  scale in the DCT (PIL's draft mode). Entropy decoding still dominates, and PIL does it 1.2x
  faster than TensorFlow's decoder (measured: full-size photos, 4 threads on 2 cores, 433 vs
  373 images/s); it releases the GIL, so threads decode in parallel.
  """
  try:
    with Image.open(path) as im:
      im.draft('RGB', (image_size, image_size))
      rgb = im.convert('RGB')  # grey, palette, CMYK, alpha: all to RGB; reads the pixels
      return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR,
                                   reducing_gap=None))
  except Exception as e:  # pylint: disable=broad-except
    # Mostly OSError, but malformed files can raise struct.error, EOFError, IndexError, ...
    raise ImageReadError(f'{path}: not a readable image ({_reason(path, e)})') from None


def _reason(path: str, error: Exception) -> str:
  if isinstance(error, UnidentifiedImageError):  # its message repeats the path
    empty = os.path.getsize(path) == 0
    return 'the file is empty' if empty else 'not a JPEG, PNG, GIF, BMP or WebP image'
  return str(error) or type(error).__name__


def _fingerprint(splits: dict[str, FileList], class_names: list[str]) -> str:
  h = hashlib.sha256(repr(class_names).encode())
  for split in SPLITS:
    for p, y in zip(splits[split].paths, splits[split].labels):
      st = os.stat(p)
      h.update(f'{split}|{os.path.basename(p)}|{y}|{st.st_size}|{int(st.st_mtime)}\n'.encode())
  return h.hexdigest()[:12]


class ImageFolderCache(tfds.core.GeneratorBasedBuilder):
  """Decoded, resized uint8 images of one image folder at one size, as a TFDS dataset."""

  # 2.0.0: decoded by PIL (1.0.0 caches hold TensorFlow's decoding, which differs by ~0.3 levels).
  VERSION = tfds.core.Version('2.0.0')

  def __init__(self, *, splits: dict[str, FileList], class_names: list[str], image_size: int,
               name: str, **kwargs):
    self._splits, self._class_names, self._image_size = splits, class_names, image_size
    self.decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # (images, indices) a build made
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self):
    s = self._image_size
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        'label': tfds.features.ClassLabel(names=self._class_names),
        'index': np.int64,  # position in discover()'s file list: load_dataset sorts by it
    }), disable_shuffling=True)  # a shuffle on write that load_dataset would undo

  def _log_download_bytes(self):
    pass  # TFDS's "Downloading and preparing dataset Unknown size ...": load_dataset says it

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    files = self._splits[split]

    def decode(i):
      try:
        return i, read_image(files.paths[i], self._image_size)
      except ImageReadError:
        return i, None  # load_dataset names it, on this run and on every run using the cache

    kept, images = [], np.empty((len(files.paths), self._image_size, self._image_size, 3),
                                np.uint8)
    # Two per core: while one thread reads a file or converts a result, the other decodes.
    with concurrent.futures.ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
      for i, img in pool.map(decode, range(len(files.paths))):
        if img is not None:
          kept.append(i)
          images[i] = img
          yield i, {'image': img, 'label': files.labels[i], 'index': i}
    # load_dataset takes these instead of reading back the files just written (~15% of a build).
    self.decoded[split] = (images if len(kept) == len(images) else images[kept],
                           np.array(kept, np.int64))


def _cache_root(cache_dir: str) -> pathlib.Path:
  if cache_dir:
    return pathlib.Path(cache_dir)
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


def _load_split(builder: ImageFolderCache, split: str) -> tuple[np.ndarray, np.ndarray]:
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  order = np.argsort(data['index'])
  return data['image'][order], data['index'][order]


def load_dataset(config) -> Dataset:
  """Train/hold-out/test arrays at `config.image_size`, building the cache on first use."""
  splits, class_names = discover(config.data_dir)
  fingerprint = _fingerprint(splits, class_names)
  name = f'{pathlib.Path(config.data_dir).resolve().name}_{config.image_size}px_{fingerprint}'
  root = _cache_root(config.cache_dir)
  root.mkdir(parents=True, exist_ok=True)
  # TFDS writes into a temporary folder and renames it, so a killed build leaves nothing
  # half-written; the lock makes concurrent sweep runs build once and share the result.
  with open(root / f'{name}.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    # Made under the lock: a builder made earlier would not see splits another process wrote.
    with _quiet_tfds():
      builder = ImageFolderCache(splits=splits, class_names=class_names,
                                 image_size=config.image_size, name=name, data_dir=str(root))
    if not builder.is_prepared():
      # A build killed earlier leaves its temporary folder; under the lock nobody else uses it.
      for stale in pathlib.Path(builder.data_dir).parent.glob('incomplete.*'):
        shutil.rmtree(stale, ignore_errors=True)
      n, t = sum(len(s.paths) for s in splits.values()), time.perf_counter()
      print(f'decoding {n} images once into {root} ...', flush=True)
      builder.download_and_prepare()
      t = time.perf_counter() - t
      print(f'cache built: {n} images in {t:.1f} s ({n / t:.0f} images/s)', flush=True)
    fcntl.flock(lock, fcntl.LOCK_UN)

  with _quiet_tfds():
    load = lambda split: builder.decoded.get(split) or _load_split(builder, split)
    train_all, train_idx = load('train')
    test_images, test_idx = load('val')
  train_files, test_files = splits['train'], splits['val']
  skipped = sorted(set(train_files.paths) - {train_files.paths[i] for i in train_idx}
                   | set(test_files.paths) - {test_files.paths[i] for i in test_idx})
  for path in skipped:
    try:
      read_image(path, config.image_size)  # again, for the reason: the cache does not keep it
      reason = f'{path}: unreadable when the cache was built'
    except ImageReadError as e:
      reason = str(e)
    print(f'warning: skipping unreadable image {reason}', file=sys.stderr, flush=True)
  labels = np.asarray(train_files.labels, np.int32)[train_idx]
  keep, held = holdout_split(labels, config.holdout_fraction, config.seed)
  return Dataset(
      train_images=train_all[keep], train_labels=labels[keep],
      holdout_images=train_all[held], holdout_labels=labels[held],
      test_images=test_images,
      test_labels=np.asarray(test_files.labels, np.int32)[test_idx],
      test_paths=[test_files.paths[i] for i in test_idx],
      class_names=class_names, skipped=skipped)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`: a pure function of (seed, epoch), so a resumed run repeats it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Full shuffled batches of one epoch from batch `start` on; the remainder waits a reshuffle."""
  perm = epoch_permutation(seed, epoch, len(labels))
  for i in range(start, len(labels) // batch_size):
    idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])  # sorted: faster gather
    yield {'image': images[idx], 'label': labels[idx]}


def eval_batches(images: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches padded to `batch_size` (one compiled shape) with a 0/1 mask on the padding."""
  for start in range(0, len(labels), batch_size):
    img, lab = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(lab)
    yield {
        'image': np.pad(img, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'label': np.pad(lab, (0, pad)),
        'mask': np.concatenate([np.ones(len(lab), np.float32), np.zeros(pad, np.float32)]),
    }
