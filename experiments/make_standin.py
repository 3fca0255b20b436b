"""Makes a smaller stand-in of an image folder, to check that a recipe is not tuned to one dataset.

    python -m experiments.make_standin --src=../shared/data/monkeys10 --dst=/tmp/m10_30pct \
        --train_fraction=0.3
    python -m experiments.make_standin --src=../shared/data/monkeys10 --dst=/tmp/m10_5cls \
        --num_classes=5

The stand-in has the same layout (train/<class>/, val/<class>/) and links to the source's files
instead of copying them. `--train_fraction` keeps a seeded, per-class share of train/ (val/, the
test split, stays whole, so test figures stay comparable); `--num_classes` keeps the first classes
in sorted order, both splits.
"""

import os
import pathlib
import sys

if __package__ in (None, ''):  # `python experiments/make_standin.py`: the repo root on the path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('src', None, 'A folder with train/<class>/ and val/<class>/.', required=True)
  flags.DEFINE_string('dst', None, 'The stand-in to create (must not exist).', required=True)
  flags.DEFINE_float('train_fraction', 1.0, 'Share of each class\'s train/ images to keep.')
  flags.DEFINE_integer('num_classes', 0, 'Keep the first N classes (sorted); 0 = all.')
  flags.DEFINE_integer('seed', 0, 'Which train/ images the fraction keeps.')


def kept_files(files: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
  """A seeded `fraction` of `files` (at least one), in sorted order."""
  keep = max(1, round(len(files) * fraction))
  return sorted(rng.choice(sorted(files), size=keep, replace=False).tolist())


def make_standin(src: str, dst: str, *, train_fraction: float = 1.0, num_classes: int = 0,
                 seed: int = 0) -> dict[str, int]:
  """Links the kept files of src into dst; returns the number of images per split."""
  src_path, dst_path = pathlib.Path(src).resolve(), pathlib.Path(dst)
  if dst_path.exists():
    raise SystemExit(f'error: {dst} exists; give --dst a new folder')
  if not 0 < train_fraction <= 1:
    raise SystemExit(f'error: --train_fraction={train_fraction} must be in (0, 1]')
  classes = sorted(p.name for p in (src_path / 'train').iterdir() if p.is_dir())
  classes = classes[:num_classes] if num_classes > 0 else classes
  rng, counts = np.random.default_rng(seed), {}
  for split in ('train', 'val'):
    for name in classes:
      files = [p.name for p in (src_path / split / name).iterdir() if p.is_file()]
      if split == 'train':
        files = kept_files(files, train_fraction, rng)
      os.makedirs(dst_path / split / name)
      for f in files:
        os.symlink(src_path / split / name / f, dst_path / split / name / f)
      counts[split] = counts.get(split, 0) + len(files)
  return counts


def main(argv):
  del argv
  counts = make_standin(FLAGS.src, FLAGS.dst, train_fraction=FLAGS.train_fraction,
                        num_classes=FLAGS.num_classes, seed=FLAGS.seed)
  print(f'{FLAGS.dst}: {counts["train"]} train and {counts["val"]} val images')


if __name__ == '__main__':
  define_flags()
  app.run(main)
