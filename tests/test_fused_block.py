"""cnn.layers' pool and fused batch norm -> ReLU -> pool against the Flax ops they replace."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import layers
from cnn import models
from configs import optimal


def _flax_pool(x):
  return nn.max_pool(x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2], (2, 2), (2, 2))


def _normal(seed, shape):
  # NumPy's generator: jax.random compiles a threefry program per shape, seconds on XLA:CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _tied(seed, shape):
  """Normal values rounded to halves: most 2x2 windows hold a tie, many a tied maximum."""
  return jnp.round(_normal(seed, shape) * 2) / 2


@functools.partial(jax.jit, static_argnums=0)
def _vjp(f, primals, cotangent):
  # Jitted: one compiled program per function and shape, where op by op each of the blocks'
  # many small ops compiles on its own.
  out, pull = jax.vjp(f, *primals)
  return out, pull(cotangent)


@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (3, 8, 6, 5)])
def test_max_pool_gradient_goes_to_the_first_maximum_as_in_nn_max_pool(shape):
  x = _tied(0, shape)
  g = _normal(1, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  (y, (dx,)), (y_ref, (dx_ref,)) = _vjp(layers.max_pool_2x2, (x,), g), _vjp(_flax_pool, (x,), g)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  # Each window passes its gradient to exactly one member, even when its maximum is tied.
  assert int((dx != 0).sum()) == int((g != 0).sum())


def _reference_block(x, shift, scale, bias):
  """nn.BatchNorm (training mode, as the model configures it) -> ReLU -> nn.max_pool."""
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)
  stats = {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}
  y, upd = bn.apply({'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}, x + shift,
                    mutable=['batch_stats'])
  return _flax_pool(jax.nn.relu(y)), upd['batch_stats']


def _fused_block(x, shift, scale, bias):
  stats = {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}
  y, upd = layers.BatchNormReluPool(momentum=0.99, epsilon=1e-3).apply(
      {'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}, x, shift,
      mutable=['batch_stats'])
  return y, upd['batch_stats']


@pytest.mark.parametrize('shape', [(4, 7, 9, 5), (3, 30, 31, 16)])
def test_fused_block_matches_batch_norm_relu_max_pool_values_stats_and_gradients(shape):
  k = [100 * shape[1] + i for i in range(6)]  # seeds
  c = shape[-1]
  x = _tied(k[0], shape) + 3.0  # a mean far from 0, as a conv output with bias can have
  shift = _normal(k[1], (c,))  # the conv bias the block absorbs
  scale = _normal(k[2], (c,))  # some negative: the window minimum of x wins there
  bias = _normal(k[3], (c,))
  # Random cotangents for the output and for both running statistics (which a training step
  # never differentiates, but the block must get right all the same).
  out_shape = jax.eval_shape(_reference_block, x, shift, scale, bias)[0].shape
  cot = (_normal(k[4], out_shape), {'mean': _normal(k[5], (c,)), 'var': _normal(k[5], (c,)) * 0.5})
  out, grads = _vjp(_fused_block, (x, shift, scale, bias), cot)
  out_ref, grads_ref = _vjp(_reference_block, (x, shift, scale, bias), cot)
  # Both use the one-pass variance E[x^2] - E[x]^2, whose float32 rounding grows with the mean;
  # the reference's mean includes the shift, the block's does not: ~1e-4 relative apart.
  tol = dict(rtol=3e-4, atol=3e-4)
  np.testing.assert_allclose(out[0], out_ref[0], **tol)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(out[1][name], out_ref[1][name], **tol)
  for i, name in ((0, 'x'), (2, 'scale'), (3, 'bias')):
    a, b = grads[i], grads_ref[i]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()), err_msg=name)
  # The shift reaches only the running mean: exact here, the sum of a cancelling dx in autodiff.
  np.testing.assert_allclose(grads[1], 0.01 * cot[1]['mean'], rtol=1e-6)
  np.testing.assert_allclose(grads_ref[1], 0.01 * cot[1]['mean'], atol=3e-4)


def test_fused_block_in_bfloat16_matches_float32_within_bfloat16_precision():
  # Values bfloat16 holds exactly: both runs pick the same window winners.
  x = _normal(0, (4, 12, 12, 8)).astype(jnp.bfloat16).astype(float)
  scale, bias = jnp.full((8,), 1.5), jnp.full((8,), 0.1)
  f = lambda x: layers.bn_relu_pool(x, scale, bias, 1e-3)[0].astype(jnp.float32)
  y16, (dx16,) = _vjp(f, (x.astype(jnp.bfloat16),), jnp.ones((4, 6, 6, 8)))
  y32, (dx32,) = _vjp(f, (x,), jnp.ones((4, 6, 6, 8)))
  assert y16.dtype == jnp.float32 and dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16, y32, rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(dx16.astype(jnp.float32), dx32, rtol=5e-2, atol=5e-2)


def _modules_called(model, variables, x, **kwargs):
  seen = set()

  def record(next_fun, args, kw, context):
    seen.add(type(context.module).__name__)
    return next_fun(*args, **kw)

  # Which modules run is decided while tracing: shapes only, nothing compiled or computed.
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)
  return seen


def test_training_forward_and_gradients_of_the_fast_model_match_the_flax_model():
  c = optimal.get_config()
  c.first_layer_filters, c.dropout = 8, 0.0
  fast = models.create_model(c, 10)  # the CPU default: cnn/layers.py
  plain = fast.clone(conv_impl='xla')
  v = models.init_variables(plain, 96, jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 96, 96, 3)), jnp.float32)
  labels = jnp.arange(4)
  assert 'BatchNormReluPool' in _modules_called(fast, v, x, train=True, mutable=['batch_stats'])
  assert 'BatchNormReluPool' not in _modules_called(fast, v, x, train=False)

  # Jitted: one compiled program per model, where op by op each of the blocks' many small ops
  # compiles on its own.
  @functools.partial(jax.jit, static_argnums=0)
  def loss(model, v, x, labels):
    def f(params):
      logits, upd = model.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, upd)
    return jax.value_and_grad(f, has_aux=True)(v['params'])

  (l_fast, (logits_fast, upd_fast)), g_fast = loss(fast, v, x, labels)
  (l_plain, (logits_plain, upd_plain)), g_plain = loss(plain, v, x, labels)
  np.testing.assert_allclose(logits_fast, logits_plain, rtol=1e-4, atol=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         upd_fast, upd_plain)
  flat_fast = jax.tree_util.tree_leaves_with_path(g_fast)
  for (path, a), b in zip(flat_fast, jax.tree_util.tree_leaves(g_plain)):
    name = jax.tree_util.keystr(path)
    if name.startswith("['conv") and name.endswith("['bias']"):
      # The batch mean cancels a conv bias: zero here, float noise (~1e-9) in autodiff.
      assert float(jnp.abs(a).max()) == 0.0 and float(jnp.abs(b).max()) < 1e-5, name
    else:
      # atol: a channel shift common to every image is cancelled by the next batch norm,
      # so the last block's BN bias has a zero gradient (~1e-8 of float noise) in both.
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=max(1e-6, 1e-5 * float(jnp.abs(b).max())),
                                 err_msg=name)
