"""Shared fixtures: tiny generated image folders, the real photos when present, a tiny config,
one tiny trained run; a persistent JAX compilation cache; PNG-reading helpers for figure tests."""

import glob
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from cnn import config as config_lib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
TINY_CLASSES = ('red', 'green', 'blue')


def pytest_configure(config):
  """A persistent JAX compilation cache for this run, its subprocesses and the next runs.

  Most of the fast suite's time is XLA compiling the same small programs again in every run
  (and in every `main.py` subprocess); cached executables load in milliseconds. The folder
  lives under the user cache, so a fresh clone (CI's) reuses what earlier runs compiled: XLA's
  cache key holds the program, the jax version and the flags, so no stale entry is ever used.
  A JAX_COMPILATION_CACHE_DIR already set wins.
  """
  del config
  cache_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if not cache_dir:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    cache_dir = os.path.join(base, 'inat_cnn_tests', 'jax_compilation_cache')
  os.makedirs(cache_dir, exist_ok=True)
  # Every program, however quick to compile: the suite is thousands of small ones. jax reads
  # the environment variables when imported, here and in the subprocesses tests start.
  settings = {'jax_compilation_cache_dir': cache_dir,
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)
  if 'jax' in sys.modules:  # imported already (by a plugin): too late for the environment
    for name, value in settings.items():
      sys.modules['jax'].config.update(name, value)


def write_image_folder(root: pathlib.Path, per_class: dict[str, int], size: int = 40,
                       seed: int = 0) -> pathlib.Path:
  """train/ and val/ with one folder per class; class c is noise around a colour of its own."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for c, name in enumerate(TINY_CLASSES):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        img = rng.integers(0, 90, (size, size, 3))
        img[..., c] += 150
        # A bright square in a class-specific corner: learnable after flips too.
        q = size // 2
        img[(c % 2) * q:(c % 2) * q + q, :q] = 255
        suffix = '.png' if i % 2 else '.jpg'
        Image.fromarray(img.astype(np.uint8)).save(folder / f'{name}_{i}{suffix}')
  return root


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> pathlib.Path:
  return write_image_folder(tmp_path_factory.mktemp('tiny_data'), {'train': 20, 'val': 6})


@pytest.fixture(scope='session')
def tiny_cache_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('cache')


def make_tiny_config(data_dir, cache_dir):
  c = config_lib.default_config()
  c.data_dir = str(data_dir)
  c.cache_dir = str(cache_dir)
  c.download = False
  c.image_size = 32
  c.first_layer_filters = 4
  c.conv_layers = 2
  c.kernel_size = 3
  c.dense_size = 8
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.wandb_mode = 'disabled'
  return c


@pytest.fixture
def tiny_config(tiny_data_dir, tiny_cache_dir):
  return make_tiny_config(tiny_data_dir, tiny_cache_dir)


@pytest.fixture(scope='session')
def trained_workdir(tiny_data_dir, tiny_cache_dir, tmp_path_factory) -> str:
  """One tiny run trained on the three-colour folder, shared by evaluate, predict, guided_bp.

  Read-only: a test that writes into a workdir (evaluate, guided_bp, W&B) works on
  `copy_workdir(trained_workdir, ...)`. The config is tiny_config's, with batch norm (which
  evaluation and guided backprop must run in inference mode) and filters (4, 12): 4 first-layer
  filters keep evaluation's filter grids small; conv2 has more than the 10 neurons guided
  backprop explains by default.
  """
  from cnn import runs  # pylint: disable=g-import-not-at-top
  c = make_tiny_config(tiny_data_dir, tiny_cache_dir)
  c.batch_norm = True
  c.filter_org = 3.0
  c.guided_bp_layer = 'conv2'
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  runs.train_and_evaluate(c, workdir)
  return workdir


def copy_workdir(workdir, dest) -> str:
  """A private copy of a trained workdir, for a test that writes into it."""
  return str(shutil.copytree(workdir, dest))


@pytest.fixture(scope='session')
def monkeys_dir() -> pathlib.Path:
  """The real 10-class photos (../shared/data/monkeys10 or $CNN_TEST_DATA/monkeys10)."""
  base = pathlib.Path(os.environ.get('CNN_TEST_DATA', SHARED_DATA))
  path = base / 'monkeys10'
  if not (path / 'train').is_dir():
    pytest.skip(f'real photos not found at {path} (set CNN_TEST_DATA to the folder holding '
                'monkeys10/); they ship beside the project checkout, not with it')
  return path


@pytest.fixture(scope='session')
def fullres_dir() -> pathlib.Path:
  base = pathlib.Path(os.environ.get('CNN_TEST_DATA', SHARED_DATA))
  path = base / 'monkeys10_fullres_sample'
  if not (path / 'train').is_dir():
    pytest.skip(f'full-resolution photos not found at {path} (set CNN_TEST_DATA)')
  return path


def wandb_records(path) -> list:
  """The protobuf records of an offline run's .wandb file, as far as it is written yet.

  The installed wandb (0.31) has no Python reader of these files (wandb-core, in Go, writes and
  syncs them), so this follows wandb's format: a LevelDB-style log after a 7-byte header
  (`:W&B`, magic 0xBEE1, version 0) in 32 KiB blocks of [crc32, length, type] chunks, type 1 a
  whole record, 2-4 its first/middle/last part; the crc is zlib.crc32 of the chunk seeded with
  the crc of its type byte. wandb's service may be writing the file meanwhile: reading stops
  before the first chunk that is not complete (short, or its crc does not match yet).
  """
  import zlib
  from wandb.proto import wandb_internal_pb2
  data = pathlib.Path(path).read_bytes()
  if len(data) < 7:
    return []  # the header is not written yet
  assert data[:7] == b':W&B\xe1\xbe\x00', f'{path} is not a W&B transaction log'
  pos, block, records, pending = 7, 32 * 1024, [], b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
      break  # zero padding, or a chunk still being written
    pending += chunk
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST piece of a record
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
  return records


def finished_wandb_records(run_dir, timeout: float = 90.0) -> list:
  """Records of the offline run in `run_dir` once complete.

  wandb's service process writes the .wandb file after the run (even its process) has ended,
  so wait for the file and its exit record.
  """
  deadline = time.time() + timeout
  while True:
    files = glob.glob(os.path.join(str(run_dir), 'run-*.wandb'))
    records = wandb_records(files[0]) if files else []
    if 'exit' in [r.WhichOneof('record_type') for r in records]:
      return records
    assert time.time() < deadline, f'no finished .wandb file in {run_dir} after {timeout} s'
    time.sleep(0.2)


# --- Reading figures back: the panels drawn in a PNG. -------------------------------------------

def read_png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert('RGB')).astype(int)


def panels(mask: np.ndarray, min_side: int) -> list[tuple[slice, slice]]:
  """Bounding boxes of the connected regions of `mask` at least min_side pixels on each side."""
  labelled, _ = ndimage.label(mask)
  boxes = ndimage.find_objects(labelled)
  return [b for b in boxes
          if b[0].stop - b[0].start >= min_side and b[1].stop - b[1].start >= min_side]


def colour_mask(img: np.ndarray, hex_colour: str) -> np.ndarray:
  rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
  return np.all(np.abs(img - rgb) <= 2, axis=-1)


def distinct(starts: list[int], tol: int = 5) -> int:
  """How many different positions (within tol pixels) a list of panel edges takes."""
  out = []
  for s in sorted(starts):
    if not out or s - out[-1] > tol:
      out.append(s)
  return len(out)


class Disk(NamedTuple):
  """A folder on a small tmpfs: a real disk that fills up."""
  path: pathlib.Path

  def resize(self, size: str) -> None:
    assert _mount_tmpfs(self.path, f'remount,size={size}')


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
  cmd = ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)]
  return subprocess.run(cmd, capture_output=True).returncode == 0


_NO_MOUNT = 'a tmpfs needs root or `unshare -rm` to mount, and neither works here'


def _rerun_unshared(request, tmp_path: pathlib.Path) -> None:
  """Runs the test again as root of a user and mount namespace of its own (`unshare -rm`)."""
  if os.environ.get('CNN_TEST_UNSHARED') or not shutil.which('unshare') or subprocess.run(
      ['unshare', '-rm', 'true'], capture_output=True).returncode:
    pytest.skip(_NO_MOUNT)
  cmd = ['unshare', '-rm', sys.executable, '-m', 'pytest', '-n', '0', '-q', '-rs',
         '-p', 'no:cacheprovider', f'--basetemp={tmp_path / "unshared"}', request.node.nodeid]
  run = subprocess.run(cmd, capture_output=True, text=True, cwd=request.config.rootpath,
                       env={**os.environ, 'CNN_TEST_UNSHARED': '1'}, timeout=600)
  if run.returncode == 0 and ' passed' not in run.stdout:
    pytest.skip(_NO_MOUNT)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture
def small_disk(request, tmp_path):
  """A Disk of 1 MiB, unmounted after the test. None when the test has just run (and passed)
  as root of a user namespace of its own, where a non-root user can mount one."""
  path = tmp_path / 'disk'
  path.mkdir()
  if not _mount_tmpfs(path, 'size=1m'):
    _rerun_unshared(request, tmp_path)
    yield None
    return
  try:
    yield Disk(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], check=True)
