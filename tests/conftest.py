"""Shared fixtures: tiny generated image folders, the real photos when present, a tiny config."""

import glob
import os
import pathlib
import struct
import time

import numpy as np
from PIL import Image
import pytest

from configs import default

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
TINY_CLASSES = ('red', 'green', 'blue')


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


@pytest.fixture
def tiny_config(tiny_data_dir, tiny_cache_dir):
  c = default.get_config()
  c.data_dir = str(tiny_data_dir)
  c.cache_dir = str(tiny_cache_dir)
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
