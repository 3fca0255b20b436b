"""Class probabilities of the best checkpoint for image files on disk.

    python main.py --mode=predict --workdir=WORKDIR photo.jpg more_photos/ [--json]
"""

import json
import pathlib
import sys
from typing import Sequence

import ml_collections
import numpy as np

from cnn import checkpoints
from cnn import errors
from cnn import input_pipeline
from cnn import models
from cnn import trainer


def image_files(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(files to predict, {path: error}) from files and folders (searched recursively for
  image suffixes). A named file is tried whatever its suffix; decoding tells."""
  files, bad = [], {}
  for arg in args:
    p = pathlib.Path(arg)
    if p.is_dir():
      found = sorted(str(f) for f in p.rglob('*') if f.is_file() and not f.name.startswith('.')
                     and f.suffix.lower() in input_pipeline.IMAGE_SUFFIXES)
      if not found:
        bad[arg] = (f'folder holds no images (looked for '
                    f'{", ".join(input_pipeline.IMAGE_SUFFIXES)})')
      files += found
    elif p.is_file():
      files.append(str(p))
    else:
      bad[arg] = 'no such file or folder'
  return files, bad


def predict_files(model: models.CNN, variables: dict, class_names: list[str],
                  paths: Sequence[str], config: ml_collections.ConfigDict) -> list[dict]:
  """{'path', 'top': [{'class', 'probability'}] of the top 3} for each file, in order; an
  unreadable file gets {'path', 'error'}, not an exception.

  The image size, batch size and flip averaging are the run's config's.
  """
  results = [{'path': p} for p in paths]
  images, ok = [], []
  for i, p in enumerate(paths):
    try:
      images.append(input_pipeline.read_image(p, config.image_size))
      ok.append(i)
    except input_pipeline.ImageReadError as e:
      results[i]['error'] = str(e).removeprefix(f'{p}: ')
  if ok:
    probs = np.exp(trainer.log_probabilities(model, variables, np.stack(images),
                                             config.eval_batch_size, config.tta_flip))
    for i, pr in zip(ok, probs):
      results[i]['top'] = [{'class': class_names[k], 'probability': float(pr[k])}
                           for k in np.argsort(-pr, kind='stable')[:3]]
  return results


def run_predict(config: ml_collections.ConfigDict, workdir: str, argv_rest: Sequence[str],
                json_output: bool = False) -> int:
  """--mode=predict: one line per image (or a JSON list with --json); exit status 1 only if
  no image could be predicted."""
  if not argv_rest:
    raise errors.UserError('--mode=predict needs image files or folders after the flags, e.g. '
                           f'python main.py --mode=predict --workdir={workdir} photo.jpg')
  model, variables, class_names, _ = checkpoints.load_best_model(config, workdir)
  files, unreadable = image_files(argv_rest)
  results = [{'path': p, 'error': e} for p, e in unreadable.items()] + predict_files(
      model, variables, class_names, files, config)
  if json_output:
    print(json.dumps(results, indent=2))
  else:
    for r in results:
      if 'error' in r:
        print(f'{r["path"]}: ERROR {r["error"]}', file=sys.stderr)
      else:
        print(f'{r["path"]}: ' + ', '.join(f'{t["class"]} {t["probability"]:.1%}'
                                          for t in r['top']))
  if all('error' in r for r in results):
    print(f'error: none of the {len(results)} inputs could be predicted', file=sys.stderr)
    return 1
  return 0
