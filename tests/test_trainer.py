"""The research core: optimizer, schedule, EMA, precise BN and validation, without a workdir."""

import jax
import numpy as np
import optax
import pytest

from cnn import input_pipeline
from cnn import trainer


def _batch(data, t):
  idx = np.arange(8 * (t % 6), 8 * (t % 6 + 1))
  return {'image': data.train_images[idx], 'label': data.train_labels[idx]}


def test_learning_rate_schedule_warms_up_then_decays_by_cosine(tiny_config):
  tiny_config.update(dict(learning_rate=0.1, lr_schedule='cosine', warmup_epochs=1.0,
                          num_epochs=5))
  hp = trainer.hyperparams(tiny_config, steps_per_epoch=10)
  lr = [float(trainer.learning_rate(hp, np.int32(t))) for t in range(50)]
  np.testing.assert_allclose(lr[:10], 0.1 * np.arange(1, 11) / 10, rtol=1e-6)  # linear warm-up
  assert all(a > b for a, b in zip(lr[10:], lr[11:]))  # then strictly decreasing
  np.testing.assert_allclose(lr[30], 0.1 * 0.5 * (1 + np.cos(np.pi * 20 / 40)), rtol=1e-6)
  tiny_config.lr_schedule = 'constant'
  hp = trainer.hyperparams(tiny_config, steps_per_epoch=10)
  lrs = [float(trainer.learning_rate(hp, np.int32(t))) for t in (10, 49)]
  assert lrs == pytest.approx([0.1] * 2)


def _steps_of(config, reference, grads_seq):
  """The parameters after the train state's optimizer and after `reference` take the same
  gradients at config.learning_rate."""
  state = trainer.create_train_state(config, 3, jax.random.PRNGKey(0))
  ref_params = state.params
  ref_state = reference.init(ref_params)
  for grads in grads_seq:
    state = state.apply_gradients(grads, np.float32(config.learning_rate))
    updates, ref_state = reference.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  return state.params, ref_params


@pytest.mark.parametrize('optimizer, reference', [
    ('sgd', lambda: optax.sgd(0.05, momentum=0.8, nesterov=True)),
    ('adamw', lambda: optax.adamw(0.05, weight_decay=0.1)),
    ('adam', lambda: optax.adam(0.05)),
])
def test_the_optimizer_is_optax_own_step_for_step(tiny_config, optimizer, reference):
  tiny_config.update(dict(optimizer=optimizer, learning_rate=0.05, momentum=0.8,
                          nesterov=optimizer == 'sgd', weight_decay=0.1))
  template = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0)).params
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                                      template) for _ in range(4)]
  ours, ref = _steps_of(tiny_config, reference(), grads_seq)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (ours, ref))):
    np.testing.assert_array_equal(a, b)


def test_the_optimizer_is_one_object_per_kind(tiny_config):
  """Learning rate and weight decay live in the optimizer's state, so runs that differ in them
  hold the same optimizer (and share a compiled step)."""
  states = []
  for lr, wd in ((1e-3, 0.0), (3e-2, 0.5)):
    tiny_config.update(dict(optimizer='adamw', learning_rate=lr, weight_decay=wd))
    states.append(trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0)))
  assert states[0].tx is states[1].tx
  assert float(states[1].opt_state.hyperparams['weight_decay']) == pytest.approx(0.5)


def _ema_config(tiny_config, **overrides):
  tiny_config.update(dict(batch_norm=True, ema_epochs=1.0, precise_bn_images=48, **overrides))
  return tiny_config


def test_ema_is_the_moving_average_of_the_weights_after_each_step(tiny_config):
  """ema_epochs=1 at 6 steps an epoch: decay 5/6, and after k steps each step's weights count
  in proportion to decay**age (the normalised exponential average)."""
  config = _ema_config(tiny_config)
  data = input_pipeline.load_dataset(config)
  hp = trainer.hyperparams(config, steps_per_epoch=6)
  state = trainer.create_train_state(config, 3, jax.random.PRNGKey(0))
  history = []
  for t in range(8):
    state, _ = trainer.train_step(state, _batch(data, t), hp)
    history.append(jax.tree_util.tree_map(np.array, state.params))
  weights = (5 / 6) ** np.arange(7, -1, -1)
  expected = jax.tree_util.tree_map(
      lambda *ps: sum(w * p for w, p in zip(weights, ps)) / weights.sum(), *history)
  for ours, want in zip(*map(jax.tree_util.tree_leaves, (state.ema_params, expected))):
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, b) for a, b in zip(  # an average, not the last weights
      *map(jax.tree_util.tree_leaves, (state.ema_params, state.params))))


def _dense_features(model, variables, images):
  """The dense layer's output (batch norm's input) in train mode, (N, dense_size)."""
  _, state = model.clone(dropout=0.0).apply(
      variables, images.astype(np.float32) / 255, train=True,
      mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
  return np.asarray(state['intermediates']['dense']['__call__'][0])


def test_precise_bn_is_the_average_of_the_weights_batch_statistics_and_leaves_the_state(
    tiny_config):
  tiny_config.update(dict(batch_norm=True))
  data = input_pipeline.load_dataset(tiny_config)
  hp = trainer.hyperparams(tiny_config, steps_per_epoch=6)
  state = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0))
  for t in range(6):
    state, _ = trainer.train_step(state, _batch(data, t), hp)
  running = jax.tree_util.tree_map(np.array, state.batch_stats)
  images = data.train_images[trainer.fixed_sample(data.train_labels, 48, 8, 0)]
  variables = trainer.validated_variables(state, images, 8)
  feats = [_dense_features(state.model, variables, b) for b in images.reshape(6, 8, 32, 32, 3)]
  stats = variables['batch_stats']['bn_dense']
  np.testing.assert_allclose(stats['mean'], np.mean([f.mean(0) for f in feats], 0), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(stats['var'], np.mean([f.var(0) for f in feats], 0), rtol=1e-4,
                             atol=1e-5)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (state.batch_stats, running))):
    np.testing.assert_array_equal(a, b)  # training continues from its own running averages


def test_evaluation_scores_log_probabilities_of_every_image(tiny_config):
  """Padding to whole batches changes no score: 7 images in batches of 4 score as one by one."""
  data = input_pipeline.load_dataset(tiny_config)
  state = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  images, labels = data.train_images[:7], data.train_labels[:7]
  log_p = trainer.log_probabilities(state.model, variables, images, 4)
  one_by_one = np.concatenate([trainer.log_probabilities(state.model, variables, images[i:i + 1],
                                                         1) for i in range(7)])
  np.testing.assert_allclose(log_p, one_by_one, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-5)
  loss, acc = trainer.evaluate_arrays(state.model, variables, (images, labels), 4)
  assert loss == pytest.approx(-np.mean(log_p[np.arange(7), labels]), rel=1e-6)
  assert acc == np.mean(np.argmax(log_p, -1) == labels)


def test_the_loop_calls_its_hooks_and_stops_when_one_says_so(tiny_config):
  data = input_pipeline.load_dataset(tiny_config)
  state = trainer.create_train_state(tiny_config, 3, jax.random.PRNGKey(0))
  seen = {'steps': 0, 'epochs': []}

  def after_step(s, sums):
    seen['steps'] += 1
    return False

  def end_of_epoch(s, sums):
    seen['epochs'].append(sums.host()[2])  # images counted in the epoch
    return len(seen['epochs']) == 2

  loop = trainer.Loop(trainer.hyperparams(tiny_config, 3), False, False, 3, after_step,
                      end_of_epoch)
  state = trainer.train_loop(state, (_batch(data, t) for t in range(12)), loop)
  assert seen == {'steps': 6, 'epochs': [24.0, 24.0]} and int(state.step) == 6
