import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from configs import default, optimal


def _uniform(seed, shape):
  # NumPy's generator: jax.random compiles a threefry program per shape, seconds on XLA:CPU.
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _counts(config, image_size, num_classes=10):
  model = models.create_model(config, num_classes)
  v = jax.eval_shape(lambda: models.init_variables(model, image_size, jax.random.PRNGKey(0)))
  return models.count_parameters(v['params']), models.count_parameters(v.get('batch_stats', {}))


def test_optimal_config_matches_the_reference_parameter_count():
  assert _counts(optimal.get_config(), 256) == (446_730, 896)


def _case_id(case):
  """A case's test id, as pytest would write its fields as separate parameters."""
  return '-'.join(map(str, case))


# (first_layer_filters, filter_org, kernel_size, dense_size, image size, padding).
@pytest.mark.parametrize('case', [
    (32, 1.0, 3, 64, 256, 'VALID'), (32, 2.0, 5, 32, 256, 'VALID'), (64, 0.5, 7, 128, 256, 'VALID'),
    (16, 1.0, 3, 32, 64, 'SAME'), (8, 2.0, 5, 16, 96, 'SAME'),
], ids=_case_id)
def test_parameter_count_matches_hand_count(case):
  first, org, k, dense, size, padding = case
  c = default.get_config()
  c.first_layer_filters, c.filter_org, c.kernel_size, c.dense_size = first, org, k, dense
  c.padding = padding
  filters = [int(first * org**i) for i in range(5)]
  expected, cin, s = 0, 3, size
  for f in filters:
    expected += k * k * cin * f + f
    cin = f
    s = (s - k + 1 if padding == 'VALID' else s) // 2
  expected += s * s * cin * dense + dense + dense * 10 + 10
  assert _counts(c, size) == (expected, 0)


def test_output_shape_and_intermediates():
  c = default.get_config()
  c.first_layer_filters, c.batch_norm = 8, True
  model = models.create_model(c, num_classes=7)
  v = models.init_variables(model, 96, jax.random.PRNGKey(0))
  x = jnp.ones((3, 96, 96, 3))
  logits = model.apply(v, x)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  shapes = [models.block_output(model, v, x, f'conv{i}').shape for i in range(1, 6)]
  assert shapes == [(3, 94, 94, 8), (3, 45, 45, 8), (3, 20, 20, 8), (3, 8, 8, 8), (3, 2, 2, 8)]


def test_max_pool_equals_flax_max_pool_on_odd_sizes():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 9, 3)), jnp.float32)
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID'))


def test_activation_is_selectable_by_name():
  # Two blocks at 16 px: the activation is applied the same way in every block, and one set of
  # weights for all (the activation has none) shows that the name alone changes the output.
  c = default.get_config()
  c.first_layer_filters, c.conv_layers, c.image_size = 4, 2, 16
  x = _uniform(2, (2, 16, 16, 3))
  v = models.init_variables(models.create_model(c, 10), 16, jax.random.PRNGKey(0))
  outs = {}
  for name in ('relu', 'gelu', 'silu', 'elu', 'leaky_relu', 'mish'):
    c.activation = name
    model = models.create_model(c, 10)
    assert model.activation == name
    outs[name] = np.asarray(jax.jit(model.apply)(v, x))
  assert len({o.tobytes() for o in outs.values()}) == len(outs)  # each really changes the net
  with pytest.raises(ValueError, match='unknown activation'):
    models.create_model(c.copy_and_resolve_references(), 10).clone(activation='swish2').apply(v, x)


# VALID as the reference; SAME at 64 px with kernel 5, whose last blocks (4x4, 2x2) are smaller
# than the kernel and take the patches-matmul path.
@pytest.mark.parametrize('size,padding,kernel,org', [(96, 'VALID', 3, 1.0), (64, 'SAME', 5, 2.0)])
def test_cpu_eigen_convolutions_are_a_drop_in_for_nn_conv(size, padding, kernel, org):
  c = optimal.get_config()
  c.first_layer_filters, c.image_size, c.conv_impl = 4 if org > 1 else 8, size, 'cpu_eigen'
  c.padding, c.kernel_size, c.filter_org = padding, kernel, org
  fast = models.create_model(c, 10)
  plain = fast.clone(conv_impl='xla')
  v = models.init_variables(plain, size, jax.random.PRNGKey(0))
  # Its structure only, traced: compiling an init (JAX's RNG) takes seconds on XLA:CPU.
  v_fast = jax.eval_shape(lambda: models.init_variables(fast, size, jax.random.PRNGKey(0)))
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_fast)
  x = _uniform(1, (2, size, size, 3))

  # One compiled program per model for its logits and gradients (op by op, the custom layers'
  # many small ops each compile on their own).
  logits_and_grads = jax.jit(
      lambda m, v, x: jax.value_and_grad(
          lambda p: _sum_and_value(m.apply({**v, 'params': p}, x)), has_aux=True)(v['params']),
      static_argnums=0)
  (_, y_fast), g_fast = logits_and_grads(fast, v, x)
  (_, y_plain), g_plain = logits_and_grads(plain, v, x)
  np.testing.assert_allclose(y_fast, y_plain, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def _sum_and_value(y):
  return y.sum(), y


def test_auto_conv_impl_is_the_fast_cpu_layers_on_cpu_and_xla_elsewhere(monkeypatch):
  assert default.get_config().conv_impl == 'auto'
  assert models.create_model(optimal.get_config(), 10).conv_impl == 'cpu_eigen'  # tests run on CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert models.resolve_conv_impl('auto') == 'xla'
  assert models.resolve_conv_impl('cpu_eigen') == 'cpu_eigen'


def test_both_pools_give_a_tied_windows_gradient_to_its_first_maximum():
  """The XLA path (nn.max_pool) and the CPU path (layers.max_pool_2x2) train alike at ties."""
  from cnn import layers
  x = jnp.ones((1, 4, 6, 2))  # every window is one tie
  g = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 3, 2))
  expected = np.zeros((1, 4, 6, 2), np.float32)
  expected[:, ::2, ::2] = g  # the first (top-left) element of each window gets it all
  for pool in (models.max_pool_2x2, layers.max_pool_2x2):
    _, vjp = jax.vjp(pool, x)
    np.testing.assert_allclose(vjp(g)[0], expected, rtol=1e-6)


def test_flip_averaging_averages_the_probabilities_of_an_image_and_its_mirror():
  model = models.CNN(filters=(4, 4), kernel_size=3, dense_size=8, num_classes=3)
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 20, 20, 3))
  v = model.init(jax.random.PRNGKey(5), x)
  p = lambda images: jax.nn.softmax(model.apply(v, images))
  averaged = np.exp(models.log_probabilities(model, v, x, tta_flip=True))
  np.testing.assert_allclose(averaged, (p(x) + p(x[:, :, ::-1])) / 2, rtol=1e-5)
  np.testing.assert_allclose(np.exp(models.log_probabilities(model, v, x)), p(x), rtol=1e-5)
