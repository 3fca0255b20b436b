"""A workdir written by the previous code (commit 1b41879) resumes, evaluates and predicts.

tests/fixtures/workdir_1b41879/ was trained by that commit on conftest's tiny folders (the
same generator and seed as `tiny_data_dir`): 2 epochs of a batch-norm model with augmentation.
Its config.json lacks every field added since; they take their defaults.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from cnn import checkpoints
from cnn import errors
from cnn import evaluate
from cnn import predict
from cnn import train
from configs import default

OLD = pathlib.Path(__file__).parent / 'fixtures' / 'workdir_1b41879'


def _old_workdir(tmp_path, tiny_data_dir, tiny_cache_dir):
  """A copy of the old workdir pointed at this machine's tiny folders, and its config."""
  workdir = tmp_path / 'old'
  shutil.copytree(OLD, workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  saved.update(data_dir=str(tiny_data_dir), cache_dir=str(tiny_cache_dir))
  (workdir / 'config.json').write_text(json.dumps(saved))
  # As main.py loads it: fields added since take their defaults.
  return workdir, checkpoints.load_run_config(str(workdir), default.get_config())


def test_an_old_workdir_resumes_where_it_stopped(tmp_path, tiny_data_dir, tiny_cache_dir, capsys):
  workdir, config = _old_workdir(tmp_path, tiny_data_dir, tiny_cache_dir)
  old_best = checkpoints.restore_best(str(workdir))[1]
  config.num_epochs = 3  # one more epoch than it ran: resumes from its latest checkpoint
  summary = train.train_and_evaluate(config, str(workdir))
  assert 'resuming' in capsys.readouterr().out
  history = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == [1, 2, 3] and history[-1]['step'] == 18
  assert summary['epochs_run'] == 3
  # Its early-stopping state came back from the old checkpoint's meta.
  assert summary['best_val_accuracy'] >= old_best['val_acc']


def test_an_old_workdir_evaluates_and_predicts(tmp_path, tiny_data_dir, tiny_cache_dir):
  workdir, config = _old_workdir(tmp_path, tiny_data_dir, tiny_cache_dir)
  metrics = evaluate.evaluate(config, str(workdir))
  assert metrics['num_test_images'] == 18 and metrics['best_epoch'] == 2
  csv = evaluate.read_predictions_csv(str(workdir / 'evaluation' / 'predictions.csv'))
  assert np.mean(csv['true_label'] == csv['pred_label']) == metrics['test_accuracy']
  model, variables, names, _ = checkpoints.load_best_model(config, str(workdir))
  photo = next((tiny_data_dir / 'val' / 'red').iterdir())
  (result,) = predict.predict_files(model, variables, names, [str(photo)], config.image_size)
  assert not result.error and len(result.top) == 3
  assert abs(sum(p for _, p in result.top) - 1) < 1e-5


def test_an_old_workdir_refuses_a_field_added_since_at_another_value(tmp_path, tiny_data_dir,
                                                                    tiny_cache_dir):
  """Its checkpoint has no EMA of the weights: resuming it with one must say so, not crash."""
  workdir, config = _old_workdir(tmp_path, tiny_data_dir, tiny_cache_dir)
  config.num_epochs, config.ema_epochs = 3, 2.0
  with pytest.raises(errors.WorkdirError, match=r'ema_epochs: 0\.0 -> 2\.0.*--config\.new_run'):
    train.train_and_evaluate(config, str(workdir))
  assert checkpoints.restore_best(str(workdir))[1]['epoch'] == 2  # the old run is untouched
