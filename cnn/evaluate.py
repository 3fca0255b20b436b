"""The best checkpoint on the test split (val/), which training never saw: metrics and figures.

Writes under WORKDIR/evaluation/: test_metrics.json, predictions.csv (one row per test image,
enough to recompute every metric), predictions_grid.png, confusion_matrix.png,
first_layer_filters.png, first_layer_activations.png.
"""

import csv
import os
import pathlib
import textwrap
import time
from typing import NamedTuple

import ml_collections
import numpy as np

from cnn import checkpoints
from cnn import download
from cnn import errors
from cnn import figures
from cnn import input_pipeline
from cnn import lock
from cnn import metrics_writer
from cnn import models
from cnn import trainer

FIGURES = ('predictions_grid', 'confusion_matrix', 'first_layer_filters',
           'first_layer_activations')


def compute_metrics(labels: np.ndarray, log_probs: np.ndarray, class_names: list[str]) -> dict:
  """Accuracy, mean cross-entropy, per-class accuracy and the confusion matrix."""
  preds = log_probs.argmax(-1)
  cm = np.zeros((len(class_names),) * 2, np.int64)
  np.add.at(cm, (labels, preds), 1)  # [t, p]: images of true class t predicted as p
  per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
  return {
      'test_accuracy': float(np.mean(preds == labels)),
      'test_loss': float(-np.mean(log_probs[np.arange(len(labels)), labels])),
      'num_test_images': int(len(labels)),
      'class_names': list(class_names),
      'per_class_accuracy': {n: float(a) for n, a in zip(class_names, per_class)},
      'per_class_count': {n: int(k) for n, k in zip(class_names, cm.sum(1))},
      'confusion_matrix': cm.tolist(),
      'confusion_matrix_axes': 'rows: true class, columns: predicted class (class_names order)',
  }


def write_predictions_csv(path: str, paths: list[str], labels: np.ndarray, probs: np.ndarray,
                          class_names: list[str]) -> None:
  """One row per test image: file, true and predicted class, and every class probability."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['index', 'path', 'true_label', 'true_class', 'pred_label', 'pred_class',
                'confidence'] + [f'p_{n}' for n in class_names])
    for i, (p, y, pr) in enumerate(zip(paths, labels, probs)):
      k = int(pr.argmax())
      w.writerow([i, p, int(y), class_names[y], k, class_names[k], f'{pr[k]:.6f}']
                 + [f'{x:.6f}' for x in pr])


def read_predictions_csv(path: str) -> dict[str, np.ndarray]:
  """true_label, pred_label (int arrays) and probs (N, C) back from predictions.csv."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  probs = np.array([[float(v) for k, v in r.items() if k.startswith('p_')] for r in rows])
  return {'true_label': np.array([int(r['true_label']) for r in rows]),
          'pred_label': np.array([int(r['pred_label']) for r in rows]),
          'path': np.array([r['path'] for r in rows]), 'probs': probs}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the best checkpoint on the test split, writes metrics, predictions and figures.

  Returns test_metrics.json's content (its 'figures' are file names in WORKDIR/evaluation/).
  """
  t0 = time.time()
  model, variables, class_names, meta = checkpoints.load_best_model(config, workdir)
  download.ensure_dataset(config)
  data = input_pipeline.load_dataset(config)
  if list(data.class_names) != list(class_names):
    raise input_pipeline.DatasetError(
        f'the test folder {config.data_dir}/val has classes {data.class_names}, but the model '
        f'in {workdir} was trained on {class_names}; point --config.data_dir at its data')
  test_dir = pathlib.Path(config.data_dir) / 'val'
  log_probs = trainer.log_probabilities(model, variables, data.test_images,
                                        config.eval_batch_size, config.tta_flip)
  metrics = compute_metrics(data.test_labels, log_probs, class_names)
  metrics.update(best_epoch=meta.get('epoch'), best_val_accuracy=meta.get('val_acc'),
                 skipped_test_images=[p for p in data.skipped
                                      if pathlib.Path(p).is_relative_to(test_dir)],
                 data_dir=config.data_dir, image_size=config.image_size)

  out = os.path.join(workdir, 'evaluation')
  os.makedirs(out, exist_ok=True)
  probs = np.exp(log_probs)
  write_predictions_csv(os.path.join(out, 'predictions.csv'), data.test_paths, data.test_labels,
                        probs, class_names)
  pngs = {name: os.path.join(out, f'{name}.png') for name in FIGURES}
  _draw_figures(model, variables, Evaluation(data, probs, metrics), config.eval_image_seed, pngs)
  metrics['figures'] = {k: os.path.basename(v) for k, v in pngs.items()}  # beside this file
  checkpoints.write_json(os.path.join(out, 'test_metrics.json'), metrics)
  _note_in_summary(workdir, metrics)
  metrics['eval_time_s'] = time.time() - t0

  writer = metrics_writer.beside_training(config, workdir)
  try:
    writer.log_images({f'evaluation/{k}': v for k, v in pngs.items()})
    writer.write_summary({k: metrics[k] for k in ('test_accuracy', 'test_loss',
                                                  'num_test_images')})
  finally:
    writer.close()
  return metrics


def _note_in_summary(workdir: str, metrics: dict) -> None:
  """summary.json gets the test accuracy beside the hold-out val that chose the checkpoint.

  Not while a training run holds the workdir: it rewrites summary.json, and evaluate never writes
  a file training writes.
  """
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return
  if lock.holder(workdir) is not None:
    print(f'left summary.json as it is: a training run holds {workdir}; the test metrics are in '
          f'{os.path.join(workdir, "evaluation", "test_metrics.json")}')
    return
  summary = checkpoints.read_json(path)
  val = summary.get('best_val_accuracy')
  summary.update(test_accuracy=metrics['test_accuracy'],
                 num_test_images_evaluated=metrics['num_test_images'],
                 best_val_minus_test=None if val is None else val - metrics['test_accuracy'])
  checkpoints.write_json(path, summary)


class Evaluation(NamedTuple):
  """What the figures are drawn from: the test set, its class probabilities and its metrics."""
  data: input_pipeline.Dataset
  probs: np.ndarray
  metrics: dict


def _draw_figures(model: models.CNN, variables: dict, evaluation: Evaluation, seed: int,
                  pngs: dict[str, str]) -> None:
  """The four PNGs; the grid's images and the activations' image are drawn with `seed`."""
  data, probs, metrics = evaluation
  names = data.class_names
  acc, n, epoch = metrics['test_accuracy'], metrics['num_test_images'], metrics['best_epoch']
  where = f'best checkpoint (epoch {epoch})' if epoch else 'best checkpoint'
  figures.plot_predictions_grid(
      figures.GridData(data.test_images, data.test_labels, probs, names),
      figures.predictions_grid_indices(data.test_labels, len(names), seed),
      pngs['predictions_grid'],
      f'Test images and the predictions of the {where}: accuracy {acc:.1%} on {n} images')
  figures.plot_confusion_matrix(
      np.asarray(metrics['confusion_matrix']), names, pngs['confusion_matrix'],
      f'Confusion matrix on the test set ({n} images), {where}: accuracy {acc:.1%}')
  figures.plot_first_layer_filters(np.asarray(variables['params']['conv1']['kernel']),
                                   pngs['first_layer_filters'])

  i = int(np.random.default_rng(seed).integers(len(data.test_labels)))
  image = data.test_images[i]
  maps = np.asarray(models.block_output(model, variables, image[None] / np.float32(255.0),
                                        'conv1')[0], np.float32)
  y, k = data.test_labels[i], int(probs[i].argmax())
  figures.plot_first_layer_activations(
      image, maps, pngs['first_layer_activations'],
      title=(f'First-layer feature maps of test image #{i} (eval_image_seed={seed}): all '
             f'{maps.shape[-1]} filters after '
             f'{"batch norm and " if model.batch_norm else ""}{model.activation}'),
      caption=textwrap.fill(f'{os.path.basename(data.test_paths[i])}: true '
                            f'{figures.display_name(names[y])}, predicted '
                            f'{figures.display_name(names[k])} ({probs[i, k]:.0%})', 48))


def format_report(metrics: dict) -> str:
  lines = [f'test accuracy {metrics["test_accuracy"]:.4f}  loss {metrics["test_loss"]:.4f}  '
           f'on {metrics["num_test_images"]} test images (best checkpoint, epoch '
           f'{metrics.get("best_epoch")}, val acc {metrics.get("best_val_accuracy") or 0:.4f})']
  width = max(len(n) for n in metrics['class_names'])
  for name in metrics['class_names']:
    lines.append(f'  {name:<{width}}  {metrics["per_class_accuracy"][name]:6.1%}  '
                 f'of {metrics["per_class_count"][name]}')
  return '\n'.join(lines)


def run_evaluate(config: ml_collections.ConfigDict, workdir: str,
                 argv_rest: list[str]) -> int:
  """--mode=evaluate: config is the run's config.json with command-line overrides applied."""
  if argv_rest:
    raise errors.UserError(f'--mode=evaluate takes no positional arguments, got {argv_rest}')
  metrics = evaluate(config, workdir)
  print(format_report(metrics))
  print(f'wrote {os.path.join(workdir, "evaluation")}/: test_metrics.json, predictions.csv, '
        + ', '.join(f'{k}.png' for k in FIGURES))
  return 0
