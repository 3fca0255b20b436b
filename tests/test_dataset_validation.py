"""Bad data folders get a clear error; odd files are ignored, read by content or reported."""

import io
import json
import os
import pathlib
import shutil
import warnings

import numpy as np
from PIL import Image
import pytest

from cnn import errors
from cnn import input_pipeline
from cnn import runs
from cnn.input_pipeline import DatasetError
from tests.conftest import write_image_folder

CLASSES = ['blue', 'green', 'red']  # sorted folder names of write_image_folder


@pytest.fixture
def data(tmp_path) -> pathlib.Path:
  """A fresh tiny folder per test (tests mutate it): 3 classes, 6 train and 2 val images each."""
  return write_image_folder(tmp_path / 'data', {'train': 6, 'val': 2}, size=24, seed=1)


@pytest.fixture
def config(tiny_config, data, tmp_path):
  tiny_config.data_dir = str(data)
  tiny_config.cache_dir = str(tmp_path / 'cache')
  tiny_config.image_size = 16
  return tiny_config


def _load_error(config) -> str:
  with pytest.raises(DatasetError) as e:
    input_pipeline.load_dataset(config)
  return str(e.value)


def _image_bytes(colour: int, fmt: str, seed: int) -> bytes:
  """A noisy 24 px image dominated by channel `colour`, encoded as `fmt`."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 60, (24, 24, 3))
  img[..., colour] += 190
  buf = io.BytesIO()
  Image.fromarray(img.astype(np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _find(ds: input_pipeline.Dataset, image: np.ndarray) -> list[int]:
  """Labels of the train and hold-out images equal to `image`, pixel for pixel."""
  images = np.concatenate([ds.train_images, ds.holdout_images])
  labels = np.concatenate([ds.train_labels, ds.holdout_labels])
  return labels[np.all(images == image, axis=(1, 2, 3))].tolist()


# ---------------------------------------------------------------------------- folder errors


def test_missing_data_dir(config, tmp_path):
  config.data_dir = str(tmp_path / 'nowhere')
  assert _load_error(config) == (
      f"data_dir '{tmp_path / 'nowhere'}' does not exist. Put the data there (it must hold "
      'train/<class>/ and val/<class>/) or point at it with --config.data_dir=PATH')


@pytest.mark.parametrize('split', ['train', 'val'])
def test_missing_split(config, data, split):
  shutil.rmtree(data / split)
  message = _load_error(config)
  assert message.startswith(f'{data / split} is missing: data_dir must hold train/<class>/ and '
                            'val/<class>/')


def test_no_class_folders(config, data):
  for split in ('train', 'val'):
    shutil.rmtree(data / split)
    (data / split).mkdir()
  # Loose files and hidden folders are not classes.
  (data / 'train' / 'README.txt').write_text('images go in sub-folders')
  (data / 'train' / '.ipynb_checkpoints').mkdir()
  assert _load_error(config) == (
      f'{data / "train"} has no class folders; expected train/<class>/*.jpg')


def test_class_folders_that_differ_between_splits(config, data):
  shutil.rmtree(data / 'val' / 'blue')
  (data / 'val' / 'purple').mkdir()
  (data / 'val' / 'purple' / 'p.png').write_bytes(_image_bytes(0, 'PNG', 0))
  assert _load_error(config) == (
      "class folders differ between train/ and val/: only in train: ['blue'], only in val: "
      "['purple']. Both splits need the same classes")


def test_empty_class(config, data):
  for f in (data / 'val' / 'green').iterdir():
    f.unlink()
  (data / 'val' / 'green' / 'notes.txt').write_text('not an image')
  assert _load_error(config) == (
      f'class folder {data / "val" / "green"} holds no images; add images or remove the folder '
      'from both splits')


# ---------------------------------------------------------------------------- odd files


def test_files_that_are_not_images_are_ignored(config, data):
  (data / 'train' / 'red' / 'notes.txt').write_text('shot on a sunny day\n')
  (data / 'train' / 'red' / '.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1' + bytes(200))
  (data / 'val' / 'blue' / 'Thumbs.db').write_bytes(bytes(range(256)))
  (data / 'val' / 'blue' / 'labels.csv').write_text('file,label\n')
  (data / 'train' / 'licence.md').write_text('CC-BY')  # beside the class folders
  ds = input_pipeline.load_dataset(config)
  assert ds.skipped == []
  assert np.bincount(np.concatenate([ds.train_labels, ds.holdout_labels])).tolist() == [6, 6, 6]
  assert np.bincount(ds.test_labels).tolist() == [2, 2, 2]
  assert all(p.endswith(('.png', '.jpg')) for p in ds.test_paths)


def test_missing_or_wrong_suffix_is_read_by_content_with_its_folders_label(config, data):
  blue, green = CLASSES.index('blue'), CLASSES.index('green')
  odd = {  # path -> (content, label)
      data / 'train' / 'blue' / 'png_named.jpg': (_image_bytes(2, 'PNG', 10), blue),
      data / 'train' / 'blue' / 'jpeg_named.png': (_image_bytes(2, 'JPEG', 11), blue),
      data / 'train' / 'green' / 'n9151jpg': (_image_bytes(1, 'JPEG', 12), green),
      data / 'train' / 'green' / 'webp_photo.webp': (_image_bytes(1, 'WEBP', 13), green),
      data / 'val' / 'green' / 'no_suffix': (_image_bytes(1, 'PNG', 14), green),
      data / 'val' / 'blue' / 'webp_no_suffix': (_image_bytes(2, 'WEBP', 15), blue),
  }
  for path, (content, _) in odd.items():
    path.write_bytes(content)
  ds = input_pipeline.load_dataset(config)
  assert ds.skipped == []
  assert np.bincount(np.concatenate([ds.train_labels, ds.holdout_labels])).tolist() == [8, 8, 6]
  for path, (content, label) in odd.items():
    # Decode by hand from the content with PIL: the pipeline's image must show the same colour.
    expected = np.asarray(Image.open(io.BytesIO(content)).convert('RGB'), np.float32)
    image = input_pipeline.read_image(str(path), config.image_size)
    assert np.abs(image.mean((0, 1)) - expected.mean((0, 1))).max() < 8, path
    if path.parent.parent.name == 'train':
      assert _find(ds, image) == [label], path
    else:
      i = ds.test_paths.index(str(path))
      assert ds.test_labels[i] == label
      np.testing.assert_array_equal(ds.test_images[i], image)


def test_corrupt_images_are_skipped_named_and_listed_in_the_summary(config, data, tmp_path,
                                                                      capsys):
  good = (data / 'train' / 'red' / 'red_0.jpg').read_bytes()
  truncated = data / 'train' / 'red' / 'truncated.jpg'
  truncated.write_bytes(good[:len(good) // 2])
  garbage = data / 'val' / 'blue' / 'garbage.png'
  garbage.write_bytes(b'this is not a PNG' * 20)
  empty = data / 'train' / 'green' / 'IMG_0001.JPG'
  empty.write_bytes(b'')
  unreadable = sorted(map(str, (truncated, garbage, empty)))

  config.num_epochs = 1
  summary = runs.train_and_evaluate(config, str(tmp_path / 'run'))
  out = capsys.readouterr()
  on_disk = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert on_disk['skipped_images'] == summary['skipped_images'] == unreadable
  assert on_disk['num_skipped_images'] == 3
  # Every good image is used, none of the bad ones.
  assert summary['num_train_images'] + summary['num_holdout_images'] == 18
  assert summary['num_test_images'] == 6
  for path in unreadable:  # one warning per file, naming it
    assert sum(path in line for line in out.err.splitlines()) == 1, out.err
  assert 'truncated' in out.err.lower() and 'not a JPEG, PNG, GIF, BMP or WebP image' in out.err
  assert 'the file is empty' in out.err

  # A later run loads the cache and still names them, once each.
  ds = input_pipeline.load_dataset(config)
  err = capsys.readouterr().err
  assert ds.skipped == unreadable
  for path in unreadable:
    assert sum(path in line for line in err.splitlines()) == 1, err


def test_dataset_error_is_a_user_error():
  assert issubclass(DatasetError, errors.UserError)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_a_class_with_no_readable_image_is_an_error(config, data, split):
  files = sorted((data / split / 'red').iterdir())
  for f in files:
    f.write_bytes(b'not an image at all' * 10)
  message = _load_error(config)
  assert message.startswith(
      f'class folder {data / split / "red"} has no readable images: all {len(files)} of its '
      f'image files failed to decode (first: {files[0]}: not a readable image (')
  assert message.endswith('); replace them, or remove the class folder from both splits')


def test_many_unreadable_images_name_the_first_five_and_count_the_rest(config, data, capsys):
  bad = sorted(str(data / 'train' / 'green' / f'bad_{i:02d}.jpg') for i in range(8))
  for path in bad:
    pathlib.Path(path).write_bytes(b'')
  for _ in range(2):  # on the build and when read from the cache
    ds = input_pipeline.load_dataset(config)
    err = capsys.readouterr().err.splitlines()
    assert ds.skipped == bad
    assert [line.split()[4] for line in err[:5]] == [f'{p}:' for p in bad[:5]]
    assert err[5:] == ['warning: ... and 3 more unreadable images; all are listed in summary.json']


def test_decoders_warnings_stay_off_the_screen(config, data, capsys):
  # A palette PNG whose transparency is a byte string: PIL warns when converting it to RGB.
  path = data / 'train' / 'blue' / 'palette.png'
  palette = Image.fromarray(np.arange(576, dtype=np.uint8).reshape(24, 24) % 4, 'L').convert('P')
  palette.putpalette([0, 0, 255, 0, 0, 200, 20, 20, 230, 9, 9, 255])
  palette.save(path, transparency=bytes([255, 128, 0, 255]))
  with warnings.catch_warnings(record=True) as caught, Image.open(path) as im:
    warnings.simplefilter('always')
    im.convert('RGB')
  assert 'Palette images with Transparency' in str(caught[0].message)  # it does warn

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ds = input_pipeline.load_dataset(config)
  assert ds.skipped == [] and [str(w.message) for w in caught] == []
  assert capsys.readouterr().err == ''
  assert _find(ds, input_pipeline.read_image(str(path), config.image_size)) == [
      CLASSES.index('blue')]


def test_read_image_names_the_file_and_the_reason(tmp_path):
  path = tmp_path / 'half.jpg'
  good = _image_bytes(0, 'JPEG', 0)
  path.write_bytes(good[:len(good) // 3])
  with pytest.raises(input_pipeline.ImageReadError) as e:
    input_pipeline.read_image(str(path), 16)
  message = str(e.value)
  assert message.startswith(f'{path}: not a readable image (') and message.endswith(')')
  assert 'truncated' in message.lower()  # the decoder's own words


# ---------------------------------------------------------------------------- the real photos


def test_real_photos_every_file_is_loaded_with_its_folders_label(monkeys_dir, tiny_config,
                                                                  tmp_path):
  tiny_config.data_dir = str(monkeys_dir)
  tiny_config.cache_dir = str(tmp_path / 'cache')
  tiny_config.image_size = 16
  ds = input_pipeline.load_dataset(tiny_config)
  names = sorted(os.listdir(monkeys_dir / 'train'))
  assert ds.class_names == names and len(names) == 10
  count = lambda split: [len(os.listdir(monkeys_dir / split / c)) for c in names]
  train_labels = np.concatenate([ds.train_labels, ds.holdout_labels])
  assert np.bincount(train_labels, minlength=10).tolist() == count('train')
  assert np.bincount(ds.test_labels, minlength=10).tolist() == count('val')
  assert ds.skipped == []
  langur = names.index('nilgiri_langur')
  for odd in ('n9160.png', 'n9151jpg'):  # a PNG among JPEGs, a JPEG without its dot
    image = input_pipeline.read_image(str(monkeys_dir / 'train' / 'nilgiri_langur' / odd), 16)
    assert image.std() > 10  # a photo, not a blank
    assert _find(ds, image) == [langur], odd
