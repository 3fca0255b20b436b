import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn import checkpoints
from cnn import input_pipeline
from cnn import runs
from cnn import trainer

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
  summary = runs.train_and_evaluate(tiny_config, str(tmp_path))
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
  model = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0)).model
  _, acc = trainer.evaluate_arrays(model, best_vars, (data.holdout_images, data.holdout_labels),
                                   16)
  assert acc == pytest.approx(summary['best_val_accuracy'])


def test_same_seed_same_run_other_seed_other_run(tiny_config, tmp_path):
  tiny_config.data_aug = True
  tiny_config.dropout = 0.3
  params = {}
  for name, seed in (('a', 1), ('b', 1), ('c', 2)):
    tiny_config.seed = seed
    runs.train_and_evaluate(tiny_config, str(tmp_path / name))
    params[name] = _best_params(tmp_path / name)
  for x, y in zip(params['a'], params['b']):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(params['a'], params['c']))


def test_rerun_resumes_and_a_finished_run_is_not_retrained(tiny_config, tmp_path, capsys):
  tiny_config.num_epochs = 3
  full = runs.train_and_evaluate(tiny_config, str(tmp_path / 'full'))
  tiny_config.num_epochs = 1
  runs.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  tiny_config.num_epochs = 3
  resumed = runs.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  assert 'resuming' in capsys.readouterr().out
  assert _comparable(_metrics(tmp_path / 'full')) == _comparable(_metrics(tmp_path / 'split'))
  assert resumed['best_val_accuracy'] == full['best_val_accuracy']
  again = runs.train_and_evaluate(tiny_config, str(tmp_path / 'split'))
  assert 'already complete' in capsys.readouterr().out
  assert again == resumed


_KILL_AT_STEP = r'''
import os, signal, sys
sys.path.insert(0, {root!r})
from cnn import runs, trainer
import ml_collections, json
config = ml_collections.ConfigDict(json.loads({config!r}))
kill_at = {kill_at}
real_step = trainer.train_step
def train_step(state, batch, hp, **kw):
  out = real_step(state, batch, hp, **kw)
  if kill_at >= 0 and int(out[0].step) == kill_at:
    os.kill(os.getpid(), signal.SIGTERM)
  return out
trainer.train_step = train_step
runs.train_and_evaluate(config, {workdir!r})
'''


def _run_killed_at(config, workdir, kill_at):
  code = _KILL_AT_STEP.format(root=ROOT, config=json.dumps(config.to_dict()), kill_at=kill_at,
                              workdir=str(workdir))
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)


def _comparable(history):
  return [{k: v for k, v in h.items() if 'time' not in k and 'per_second' not in k}
          for h in history]


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, tiny_data_dir, tiny_cache_dir):
  """(config, workdir) of the uninterrupted run the killed-and-resumed ones must equal."""
  config = _kill_config(tiny_data_dir, tiny_cache_dir)
  workdir = tmp_path_factory.mktemp('straight')
  runs.train_and_evaluate(config, str(workdir))
  return config, workdir


def _kill_config(data_dir, cache_dir):
  from cnn import config as config_lib
  c = config_lib.default_config()
  c.update(dict(data_dir=str(data_dir), cache_dir=str(cache_dir), download=False, image_size=32,
                first_layer_filters=4, conv_layers=2, dense_size=8, batch_size=8,
                eval_batch_size=16, num_epochs=3, wandb_mode='disabled', data_aug=True,
                dropout=0.2, batch_norm=True))
  return c


# 6 steps an epoch: mid-epoch, and right after an epoch's last step (before its validation).
@pytest.mark.parametrize('kill_at', [4, 12])
def test_sigterm_then_resume_equals_uninterrupted_run(straight_run, tmp_path, kill_at):
  config, straight = straight_run
  killed = _run_killed_at(config, tmp_path / 'run', kill_at)
  assert killed.returncode != 0, killed.stderr[-2000:]
  assert f'SIGTERM: saved a checkpoint at step {kill_at}' in killed.stderr, killed.stderr[-2000:]
  assert not (tmp_path / 'run' / 'summary.json').exists()
  resumed = _run_killed_at(config, tmp_path / 'run', -1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming' in resumed.stdout
  assert _comparable(_metrics(tmp_path / 'run')) == _comparable(_metrics(straight))
  for a, b in zip(_best_params(tmp_path / 'run'), _best_params(straight)):
    np.testing.assert_array_equal(a, b)


def test_runs_that_differ_in_learning_rate_and_seed_trace_the_train_step_once(tiny_config,
                                                                              tmp_path):
  """Learning rate, schedule and seed are traced values: one trace of the step for 3 runs."""
  from jax import monitoring
  traced = []

  def listener(event, _, **kw):
    if event == '/jax/core/compile/jaxpr_trace_duration':
      traced.append(kw.get('fun_name'))

  monitoring.register_event_duration_secs_listener(listener)
  tiny_config.num_epochs = 1
  tiny_config.image_size = 34  # a shape no other test compiles: this test's first run traces
  try:
    for i, (lr, seed) in enumerate(((1e-3, 0), (3e-3, 1), (3e-4, 2))):
      tiny_config.learning_rate, tiny_config.seed = lr, seed
      tiny_config.lr_schedule = ('constant', 'cosine')[i % 2]
      runs.train_and_evaluate(tiny_config, str(tmp_path / str(i)))
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert traced.count('train_step') == 1, traced


def _dense_features(model, variables, images):
  """The dense layer's output (batch norm's input) in train mode, (N, dense_size)."""
  _, state = model.clone(dropout=0.0).apply(
      variables, images.astype(np.float32) / 255, train=True,
      mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
  return np.asarray(state['intermediates']['dense']['__call__'][0])


@pytest.mark.parametrize('bn_stats', ['precise', 'running'])
def test_eval_mode_statistics_are_the_current_weights_batch_statistics(tiny_config, tmp_path,
                                                                       bn_stats):
  """Precise BN: after one epoch (6 steps) the eval-mode statistics are the average of the
  current weights' batch statistics; the running averages at momentum 0.99 still hold ~94% of
  their initial values (mean 0, var 1), which is the lag that made early validation noise."""
  tiny_config.update(dict(batch_norm=True, num_epochs=1, bn_stats=bn_stats,
                          precise_bn_images=48))
  runs.train_and_evaluate(tiny_config, str(tmp_path))
  variables, _ = checkpoints.restore_best(str(tmp_path))
  data = input_pipeline.load_dataset(tiny_config)
  idx = trainer.fixed_sample(data.train_labels, 48, tiny_config.batch_size, tiny_config.seed)
  batches = data.train_images[idx].reshape(6, 8, *data.train_images.shape[1:])
  model = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0)).model
  feats = [_dense_features(model, variables, b) for b in batches]
  expected_mean = np.mean([f.mean(0) for f in feats], 0)
  expected_var = np.mean([f.var(0) for f in feats], 0)
  stats = variables['batch_stats']['bn_dense']
  close = (np.allclose(stats['mean'], expected_mean, rtol=1e-4, atol=1e-5)
           and np.allclose(stats['var'], expected_var, rtol=1e-4, atol=1e-5))
  assert close == (bn_stats == 'precise')


def _ema_config(tiny_config, **overrides):
  tiny_config.update(dict(batch_norm=True, ema_epochs=1.0, precise_bn_images=48, **overrides))
  return tiny_config


def test_with_ema_the_best_checkpoint_holds_the_average_that_was_validated(tiny_config,
                                                                         tmp_path):
  """What evaluate, predict and guided_bp read (the best checkpoint) is the EMA with its own
  precise batch statistics, and scoring it again gives the val_acc that chose it."""
  config = _ema_config(tiny_config, num_epochs=1)
  summary = runs.train_and_evaluate(config, str(tmp_path))
  assert summary['validated_weights'] == 'EMA over 1 epochs'
  best, meta = checkpoints.restore_best(str(tmp_path))
  template = trainer.create_train_state(config, 3, jax.random.PRNGKey(0))
  latest, _ = checkpoints.restore_latest(str(tmp_path), template)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (best['params'], latest.ema_params))):
    np.testing.assert_array_equal(a, b)
  data = input_pipeline.load_dataset(config)
  bn_images = data.train_images[trainer.fixed_sample(data.train_labels, 48, 8, config.seed)]
  stats = trainer.precise_batch_stats(template.model, {'params': best['params'],
                                                       'batch_stats': latest.batch_stats},
                                      bn_images, 8)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (best['batch_stats'], stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  _, acc = trainer.evaluate_arrays(template.model, best, (data.holdout_images,
                                                         data.holdout_labels), 16)
  assert acc == meta['val_acc']


def test_a_resumed_ema_run_equals_the_uninterrupted_one(tiny_config, tmp_path):
  config = _ema_config(tiny_config, num_epochs=2, data_aug=True)
  straight = runs.train_and_evaluate(config, str(tmp_path / 'straight'))
  config.num_epochs = 1
  runs.train_and_evaluate(config, str(tmp_path / 'resumed'))
  config.num_epochs = 2  # one more epoch: resumes the EMA from the latest checkpoint
  resumed = runs.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['best_val_accuracy'] == straight['best_val_accuracy']
  assert (_comparable(_metrics(tmp_path / 'resumed'))
          == _comparable(_metrics(tmp_path / 'straight')))
  for a, b in zip(_best_params(tmp_path / 'resumed'), _best_params(tmp_path / 'straight')):
    np.testing.assert_array_equal(a, b)


# Golden values of version 0.2.0: the per-epoch training losses of the config below, printed by
# `python -m tests.test_runs` (2-core Intel Xeon, AVX-512). A changed random stream or update rule
# moves them by ~1e-2; another CPU's float summation order by far less than the tolerance.
_GOLDEN_TRAIN_LOSSES = [1.061455488204956, 1.0142163435618083]


def _golden_run(config, workdir) -> list[float]:
  config.update(data_aug=True, batch_norm=True, dropout=0.2, num_epochs=2, seed=3)
  runs.train_and_evaluate(config, str(workdir))
  return [h['train_loss'] for h in _metrics(workdir)]


def test_an_unchanged_config_trains_to_its_golden_losses(tiny_config, tmp_path):
  np.testing.assert_allclose(_golden_run(tiny_config, tmp_path), _GOLDEN_TRAIN_LOSSES, rtol=1e-4)


if __name__ == '__main__':
  import pathlib
  import tempfile
  from tests import conftest
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    data_dir = conftest.write_image_folder(root / 'data', {'train': 20, 'val': 6})
    print(_golden_run(conftest.make_tiny_config(data_dir, root / 'cache'), root / 'run'))
