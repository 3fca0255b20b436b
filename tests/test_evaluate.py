"""--mode=evaluate on a tiny model trained on the generated three-colour folder."""

import json
import os
import pathlib

import jax
import numpy as np
from PIL import Image
import pytest

from cnn import checkpoints
from cnn import errors
from cnn import evaluate
from cnn import figures
from cnn import input_pipeline
from cnn import models
from tests import conftest


@pytest.fixture(scope='module')
def evaluated(trained_workdir, tmp_path_factory):
  """The shared trained run, evaluated once for the module in a copy (evaluation writes)."""
  workdir = conftest.copy_workdir(trained_workdir, tmp_path_factory.mktemp('eval') / 'run')
  config = checkpoints.load_run_config(workdir)
  assert evaluate.run_evaluate(config, workdir, []) == 0
  out = os.path.join(workdir, 'evaluation')
  return workdir, out, checkpoints.read_json(os.path.join(out, 'test_metrics.json'))


def test_metrics_equal_those_recomputed_from_the_saved_predictions(evaluated, tiny_data_dir):
  _, out, metrics = evaluated
  pred = evaluate.read_predictions_csv(os.path.join(out, 'predictions.csv'))
  # Every test file on disk appears once, in val/, with the label of its folder.
  on_disk = sorted(str(p) for p in (tiny_data_dir / 'val').rglob('*') if p.is_file())
  assert sorted(pred['path']) == on_disk
  names = metrics['class_names']
  assert names == sorted(conftest.TINY_CLASSES)
  for path, y in zip(pred['path'], pred['true_label']):
    assert os.path.basename(os.path.dirname(path)) == names[y]

  y, p = pred['true_label'], pred['pred_label']
  assert metrics['num_test_images'] == len(on_disk) == 18
  assert metrics['test_accuracy'] == pytest.approx(np.mean(y == p), abs=1e-12)
  probs = pred['probs']
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  assert np.array_equal(probs.argmax(1), p)
  assert metrics['test_loss'] == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])),
                                               rel=1e-4)
  cm = np.array(metrics['confusion_matrix'])
  assert cm.sum() == metrics['num_test_images']
  assert np.array_equal(cm.sum(1), np.bincount(y, minlength=3))
  assert np.array_equal(cm, np.histogram2d(y, p, bins=[np.arange(4)] * 2)[0])
  for c, name in enumerate(names):
    assert metrics['per_class_accuracy'][name] == pytest.approx(np.mean(p[y == c] == c))
    assert metrics['per_class_count'][name] == 6


def test_saved_predictions_are_the_best_checkpoint_on_those_files(evaluated):
  """Recomputed outside the evaluation code: decode the file, run the restored model."""
  workdir, out, _ = evaluated
  config = checkpoints.load_run_config(workdir)
  variables, meta = checkpoints.restore_best(workdir)
  model = models.create_model(config, 3)
  pred = evaluate.read_predictions_csv(os.path.join(out, 'predictions.csv'))
  for i in (0, 7, 17):
    image = input_pipeline.read_image(pred['path'][i], config.image_size)
    logits = model.apply(variables, image[None].astype(np.float32) / 255.0)
    np.testing.assert_allclose(jax.nn.softmax(logits)[0], pred['probs'][i], atol=2e-6)
  summary = checkpoints.read_json(os.path.join(workdir, 'summary.json'))
  assert meta['epoch'] == summary['best_epoch']


def test_figures_exist_with_the_expected_grids(evaluated):
  _, out, metrics = evaluated
  assert set(metrics['figures']) == set(evaluate.FIGURES)
  for name in evaluate.FIGURES:
    path = os.path.join(out, f'{name}.png')
    assert metrics['figures'][name] == f'{name}.png'
    with Image.open(path) as im:
      assert im.format == 'PNG' and min(im.size) >= 300

  pred = evaluate.read_predictions_csv(os.path.join(out, 'predictions.csv'))
  img = conftest.read_png(os.path.join(out, 'predictions_grid.png'))
  # 3 classes -> 3 rows of 6; each class has exactly 6 test images, so all 18 are shown.
  green = conftest.panels(conftest.colour_mask(img, figures.CORRECT), 100)
  red = conftest.panels(conftest.colour_mask(img, figures.WRONG), 100)
  right = int(np.sum(pred['true_label'] == pred['pred_label']))
  assert (len(green), len(red)) == (right, 18 - right)
  assert conftest.distinct([b[0].start for b in green + red]) == 3
  assert conftest.distinct([b[1].start for b in green + red]) == 6

  # 4 first-layer filters -> a 2 x 2 grid of kernels and of feature maps (+ the image).
  img = conftest.read_png(os.path.join(out, 'first_layer_filters.png'))
  assert len(conftest.panels(np.any(img < 245, axis=-1), 60)) == 4
  img = conftest.read_png(os.path.join(out, 'first_layer_activations.png'))
  boxes = conftest.panels(np.any(img < 245, axis=-1), 80)
  assert len(boxes) == 4 + 1


def test_wrong_positional_args_and_foreign_data(evaluated, tmp_path):
  workdir, _, _ = evaluated
  config = checkpoints.load_run_config(workdir)
  with pytest.raises(errors.UserError, match='positional'):
    evaluate.run_evaluate(config, workdir, ['extra'])
  # Test images whose classes are not the ones the model learned: refused with a clear message.
  other = tmp_path / 'other'
  for split in ('train', 'val'):
    for name in ('cats', 'dogs'):
      (other / split / name).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / split / name / 'a.png')
  config.data_dir, config.cache_dir = str(other), str(tmp_path / 'cache')
  with pytest.raises(input_pipeline.DatasetError,
                     match=r"classes \['cats', 'dogs'\], but the model"):
    evaluate.run_evaluate(config, workdir, [])


def test_evaluate_without_a_checkpoint_says_so(tiny_config, tmp_path):
  with pytest.raises(errors.WorkdirError, match='no best checkpoint'):
    evaluate.evaluate(tiny_config, str(tmp_path))


def test_compute_metrics_by_hand():
  labels = np.array([0, 0, 1, 2, 2, 2])
  probs = np.array([[.7, .2, .1], [.2, .5, .3], [.1, .8, .1], [.3, .3, .4], [.6, .2, .2],
                    [.1, .1, .8]])
  m = evaluate.compute_metrics(labels, np.log(probs), ['a', 'b', 'c'])
  assert m['test_accuracy'] == pytest.approx(4 / 6)
  assert m['test_loss'] == pytest.approx(-np.mean(np.log([.7, .2, .8, .4, .2, .8])))
  assert m['confusion_matrix'] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
  assert m['per_class_accuracy'] == pytest.approx({'a': 0.5, 'b': 1.0, 'c': 2 / 3})
  assert json.loads(json.dumps(m)) == m  # plain JSON types only


def test_figures_are_logged_to_wandb_offline(evaluated, tmp_path):
  """With W&B on (offline here: no network), the four PNGs go into the run as images."""
  workdir = conftest.copy_workdir(evaluated[0], tmp_path / 'run')  # written into below
  config = checkpoints.load_run_config(workdir)
  config.wandb_mode = 'offline'
  # The id a training run with W&B on leaves behind; evaluate resumes that run.
  (pathlib.Path(workdir) / 'wandb_run_id.txt').write_text('evaltest1')
  evaluate.evaluate(config, workdir)
  media = list((pathlib.Path(workdir) / 'wandb').glob('offline-run-*/files/media/images/**/*.png'))
  logged = {p.name.split('_')[0] for p in media}
  assert len(media) == 4, media
  assert {'predictions', 'confusion', 'first'} == logged
