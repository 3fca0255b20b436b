import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn import checkpoints
from cnn import input_pipeline
from cnn import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _best_params(workdir):
  variables, _ = checkpoints.restore_best(str(workdir))
  return jax.tree_util.tree_leaves(variables)


def test_training_learns_and_writes_its_results(tiny_config, tmp_path):
  tiny_config.num_epochs = 6
  tiny_config.batch_norm = True
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  history = _metrics(tmp_path)
  assert [h['epoch'] for h in history] == list(range(1, 7))
  assert history[-1]['train_loss'] < 0.7 * history[0]['train_loss']
  assert summary['best_val_accuracy'] >= 0.8  # 3 well-separated classes; chance is 1/3
  assert summary['best_val_accuracy'] == max(h['val_acc'] for h in history)
  assert summary['epochs_run'] == 6 and summary['class_names'] == ['blue', 'green', 'red']
  assert summary['num_train_images'] + summary['num_holdout_images'] == 60
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['image_size'] == 32 and saved['batch_norm'] is True
  best_vars, meta = checkpoints.restore_best(str(tmp_path))
  assert meta['epoch'] == summary['best_epoch']
  # The best checkpoint really reproduces the best validation accuracy.
  data = input_pipeline.load_dataset(tiny_config)
  state = train.create_train_state(tiny_config, 3, jax.random.PRNGKey(0))
  state = state.replace(params=best_vars['params'], batch_stats=best_vars['batch_stats'])
  _, acc = train.evaluate_arrays(state, data.holdout_images, data.holdout_labels, 16,
                                 train.make_mesh())
  assert acc == pytest.approx(summary['best_val_accuracy'])


def test_same_seed_same_run_other_seed_other_run(tiny_config, tmp_path):
  tiny_config.data_aug = True
  tiny_config.dropout = 0.3
  runs = {}
  for name, seed in (('a', 1), ('b', 1), ('c', 2)):
    tiny_config.seed = seed
    train.train_and_evaluate(tiny_config, str(tmp_path / name))
    runs[name] = _best_params(tmp_path / name)
  for x, y in zip(runs['a'], runs['b']):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(runs['a'], runs['c']))


def test_rerun_resumes_and_a_finished_run_is_not_retrained(tiny_config, tmp_path, capsys):
  tiny_config.num_epochs = 3
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'))
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  tiny_config.num_epochs = 3
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  assert 'resuming' in capsys.readouterr().out
  assert _comparable(_metrics(tmp_path / 'full')) == _comparable(_metrics(tmp_path / 'split'))
  assert resumed['best_val_accuracy'] == full['best_val_accuracy']
  again = train.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  assert 'already complete' in capsys.readouterr().out
  assert again == resumed


_KILL_AT_STEP = r'''
import os, signal, sys
sys.path.insert(0, {root!r})
from cnn import train
from tests.conftest import write_image_folder
import ml_collections, json
config = ml_collections.ConfigDict(json.loads({config!r}))
kill_at = {kill_at}
real_step = train.train_step
def step(state, batch):
  out = real_step(state, batch)
  if kill_at >= 0 and int(out[0].step) == kill_at:
    os.kill(os.getpid(), signal.SIGTERM)
  return out
train.train_step = step
train.train_and_evaluate(config, {workdir!r})
'''


def _run_killed_at(config, workdir, kill_at):
  code = _KILL_AT_STEP.format(root=ROOT, config=json.dumps(config.to_dict()), kill_at=kill_at,
                              workdir=str(workdir))
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)


def _comparable(history):
  return [{k: v for k, v in h.items() if 'time' not in k and 'per_second' not in k}
          for h in history]


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tiny_config, tmp_path):
  tiny_config.num_epochs = 3
  tiny_config.data_aug = True
  tiny_config.dropout = 0.2
  tiny_config.batch_norm = True
  steps_per_epoch = 54 // tiny_config.batch_size
  kill_at = int(np.random.default_rng().integers(1, 3 * steps_per_epoch))
  killed = _run_killed_at(tiny_config, tmp_path / 'run', kill_at)
  assert killed.returncode != 0, killed.stderr[-2000:]
  assert f'SIGTERM: saved a checkpoint at step {kill_at}' in killed.stderr, killed.stderr[-2000:]
  assert not (tmp_path / 'run' / 'summary.json').exists()
  resumed = _run_killed_at(tiny_config, tmp_path / 'run', -1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming' in resumed.stdout
  train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  assert _comparable(_metrics(tmp_path / 'run')) == _comparable(_metrics(tmp_path / 'straight'))
  for a, b in zip(_best_params(tmp_path / 'run'), _best_params(tmp_path / 'straight')):
    np.testing.assert_array_equal(a, b)
