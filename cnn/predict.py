"""Class probabilities of the best checkpoint, for arrays of images or image files on disk.

    python main.py --mode=predict --workdir=WORKDIR photo.jpg more_photos/ [--json]
"""

import dataclasses
import json
import pathlib
import re
import sys
from typing import Sequence

import ml_collections
import numpy as np

from cnn import checkpoints
from cnn import input_pipeline
from cnn import models
from cnn import trainer


def image_files(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(files to predict, {path: error}) from files and folders (searched recursively for
  image suffixes). A named file is tried whatever its suffix; decoding tells."""
  files, errors = [], {}
  for arg in args:
    p = pathlib.Path(arg)
    if p.is_dir():
      found = sorted(str(f) for f in p.rglob('*') if f.is_file() and not f.name.startswith('.')
                     and f.suffix.lower() in input_pipeline.IMAGE_SUFFIXES)
      if not found:
        errors[arg] = (f'folder holds no images (looked for '
                       f'{", ".join(input_pipeline.IMAGE_SUFFIXES)})')
      files += found
    elif p.is_file():
      files.append(str(p))
    else:
      errors[arg] = 'no such file or folder'
  return files, errors


@dataclasses.dataclass
class Prediction:
  path: str
  top: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (class, probability)
  error: str = ''

  def to_json(self) -> dict:
    if self.error:
      return {'path': self.path, 'error': self.error}
    return {'path': self.path, 'top': [{'class': c, 'probability': p} for c, p in self.top]}

  def to_line(self) -> str:
    if self.error:
      return f'{self.path}: ERROR {self.error}'
    return f'{self.path}: ' + ', '.join(f'{c} {p:.1%}' for c, p in self.top)


def _readable(message: str) -> str:
  """Drops TensorFlow's op plumbing ({{function_node ...}}, [Op:DecodeImage]) from a message."""
  message = re.sub(r'\{\{.*?\}\}\s*', '', message)
  return re.sub(r'\s*\[Op:[^\]]*\][^)]*', '', message)


# PLR0913: the model, its weights and class names, the files, and the run's image settings.
def predict_files(model: models.CNN, variables: dict, class_names: list[str],  # noqa: PLR0913
                  paths: Sequence[str], image_size: int, batch_size: int = 64,
                  top_k: int = 3, tta_flip: bool = False) -> list[Prediction]:
  """Top-k classes of each file, in order; an unreadable file gets its error, not an exception."""
  results = [Prediction(p) for p in paths]
  images, ok = [], []
  for i, p in enumerate(paths):
    try:
      images.append(input_pipeline.read_image(p, image_size))
      ok.append(i)
    except input_pipeline.ImageReadError as e:
      results[i].error = _readable(str(e).removeprefix(f'{p}: '))
  if ok:
    probs = np.exp(trainer.log_probabilities(model, variables, np.stack(images), batch_size,
                                             tta_flip))
    for i, pr in zip(ok, probs):
      best = np.argsort(-pr, kind='stable')[:top_k]
      results[i].top = [(class_names[k], float(pr[k])) for k in best]
  return results


def run_predict(config: ml_collections.ConfigDict, workdir: str, argv_rest: Sequence[str],
                json_output: bool = False) -> int:
  """--mode=predict: one line per image (or a JSON list with --json); exit status 1 only if
  no image could be predicted."""
  if not argv_rest:
    print('error: --mode=predict needs image files or folders after the flags, e.g. '
          f'python main.py --mode=predict --workdir={workdir or "WORKDIR"} photo.jpg',
          file=sys.stderr)
    return 2
  model, variables, class_names, _ = checkpoints.load_best_model(config, workdir)
  files, errors = image_files(argv_rest)
  results = predict_files(model, variables, class_names, files, config.image_size,
                          config.eval_batch_size, tta_flip=config.tta_flip)
  results = [Prediction(p, error=e) for p, e in errors.items()] + results
  if json_output:
    print(json.dumps([r.to_json() for r in results], indent=2))
  else:
    for r in results:
      print(r.to_line(), file=sys.stderr if r.error else sys.stdout)
  num_ok = sum(not r.error for r in results)
  if num_ok == 0:
    print(f'error: none of the {len(results)} inputs could be predicted', file=sys.stderr)
    return 1
  return 0
