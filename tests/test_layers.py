import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn import layers
from cnn import models
from configs import default

# Minutes on 2 cores: in the slow suite (CI runs it); test_models checks the model-level swap.
pytestmark = pytest.mark.slow

# (batch, height, width, in, out, kernel, padding): odd and even kernels, non-square images,
# the RGB layer's im2col path (kh*kw*in <= 32) and the Eigen path, a kernel wider than the input.
CASES = [
    (2, 9, 11, 3, 5, 3, 'VALID'), (2, 9, 11, 3, 5, 3, 'SAME'), (3, 8, 8, 4, 6, 2, 'SAME'),
    (1, 7, 5, 2, 3, 5, 'VALID'), (2, 6, 7, 17, 20, 3, 'SAME'), (4, 12, 10, 16, 8, 3, 'VALID'),
    (4, 10, 10, 24, 12, 4, 'VALID'), (2, 4, 3, 9, 7, 5, 'SAME'), (8, 11, 9, 3, 4, 3, 'VALID'),
]


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, np.abs(b).max()))


def _case_id(case):
  """A case's test id, as pytest would write its fields as separate parameters."""
  return '-'.join(map(str, case))


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_conv_equals_flax_conv_forward_and_gradients(case):
  b, h, w, cin, cout, k, padding = case
  x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, cin))
  ref, new = nn.Conv(cout, (k, k), padding=padding), layers.Conv(cout, (k, k), padding=padding)
  v = ref.init(jax.random.PRNGKey(1), x)
  # Same parameter names, shapes and initial values from the same key.
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.init(jax.random.PRNGKey(1), x), v)
  # A loss that weights every output differently, so that each gradient entry is tested.
  probe = jax.random.normal(jax.random.PRNGKey(2), ref.apply(v, x).shape)
  loss = lambda m: lambda v, x: jnp.sum(m.apply(v, x) * probe)
  _close(new.apply(v, x), ref.apply(v, x))
  (gv_new, gx_new), (gv_ref, gx_ref) = (jax.grad(loss(m), (0, 1))(v, x) for m in (new, ref))
  _close(gx_new, gx_ref)
  _close(gv_new['params']['kernel'], gv_ref['params']['kernel'])
  _close(gv_new['params']['bias'], gv_ref['params']['bias'])


@pytest.mark.parametrize('pads', [((0, 0), (0, 0)), ((1, 1), (1, 1)), ((2, 0), (0, 1)),
                                  ((0, 3), (2, 2))])
@pytest.mark.parametrize('cin', [3, 12])
def test_conv2d_equals_lax_conv_with_explicit_padding(pads, cin):
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 7, 8, cin))
  w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, cin, 5))
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y_ref, vjp_ref = jax.vjp(lax_conv, x, w)
  y, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, pads), x, w)
  _close(y, y_ref)
  g = jax.random.normal(jax.random.PRNGKey(5), y.shape)
  for got, want in zip(vjp(g), vjp_ref(g)):
    _close(got, want)


def test_conv_works_under_vmap_jit_and_second_order_grad():
  x = jax.random.normal(jax.random.PRNGKey(6), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 4, 5))
  pads = ((1, 1), (1, 1))
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = jax.jit(jax.vmap(lambda x: layers.conv2d(x, w, pads)))(x)
  _close(ours, jax.vmap(lambda x: lax_conv(x, w))(x))
  # Gradient of a gradient norm (as in input-gradient regularisers): the backward pass is
  # itself made of differentiable convolutions.
  gnorm = lambda conv: lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, w) ** 2))(x[0]) ** 2)
  _close(jax.grad(gnorm(lambda x, w: layers.conv2d(x, w, pads)))(w), jax.grad(gnorm(lax_conv))(w),
         rtol=1e-4)


def test_bfloat16_conv_matches_flax_within_bfloat16_precision():
  x = jax.random.normal(jax.random.PRNGKey(8), (2, 10, 10, 8))
  ref = nn.Conv(6, (3, 3), padding='VALID', dtype=jnp.bfloat16)
  new = layers.Conv(6, (3, 3), padding='VALID', dtype=jnp.bfloat16)
  v = ref.init(jax.random.PRNGKey(9), x)
  y_new, y_ref = new.apply(v, x), ref.apply(v, x)
  assert y_new.dtype == y_ref.dtype == jnp.bfloat16
  _close(y_new, y_ref, rtol=2e-2)
  grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x).astype(jnp.float32) ** 2))(v)
  _close(grad(new)['params']['kernel'], grad(ref)['params']['kernel'], rtol=3e-2)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the YNNPACK/Eigen choice is XLA:CPU')
def test_no_convolution_is_left_to_ynnpack():
  """The speed-up rests on XLA:CPU running every convolution with Eigen, not YNNPACK."""
  x = jnp.ones((4, 20, 20, 16))
  w = jnp.ones((3, 3, 16, 32))
  loss = lambda x, w, pads: jnp.sum(layers.conv2d(x, w, pads) ** 2)
  for pads in (((0, 0), (0, 0)), ((1, 1), (1, 1))):
    step = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    hlo = step.lower(x, w, pads).compile().as_text()
    ynn_bodies = [c for c in hlo.split('\n\n') if 'ynn' in c.lower()]
    assert hlo.count('convolution(') == 3  # forward, input and filter gradient
    assert not any('convolution(' in c for c in ynn_bodies), 'a convolution went to YNNPACK'


def _train_losses(conv_impl, steps=4):
  """Losses of a few Adam steps of the 5-block BN model with config.conv_impl = `conv_impl`."""
  c = default.get_config()
  c.first_layer_filters, c.batch_norm, c.dropout, c.dense_size = 8, True, 0.2, 16
  c.conv_impl = conv_impl
  model = models.create_model(c, num_classes=4)
  variables = models.init_variables(model, 96, jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 96, 96, 3))
  labels = jnp.arange(8) % 4
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, batch_stats, opt_state, key):
    def loss_fn(p):
      logits, upd = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                                rngs={'dropout': key}, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd['batch_stats'], opt_state, loss

  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, images))(variables))
  assert ('custom_vjp_call' in jaxpr) == (conv_impl == 'cpu_eigen')  # the layer really is used
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state, losses = tx.init(params), []
  for i in range(steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                jax.random.PRNGKey(i))
    losses.append(float(loss))
  return variables, params, losses


def test_model_trains_like_the_plain_flax_model():
  v_new, p_new, new = _train_losses('cpu_eigen')  # cnn.layers.Conv
  v_ref, p_ref, ref = _train_losses('xla')  # nn.Conv
  # Same parameter tree and initial values: checkpoints are interchangeable.
  jax.tree_util.tree_map(np.testing.assert_array_equal, v_new, v_ref)
  assert sorted(v_new['params']) == ['bn1', 'bn2', 'bn3', 'bn4', 'bn5', 'bn_dense', 'conv1',
                                     'conv2', 'conv3', 'conv4', 'conv5', 'dense', 'logits']
  np.testing.assert_allclose(new, ref, rtol=1e-4)
  assert new[-1] < new[0]  # it does learn this batch
  for layer in p_ref:
    for name in p_ref[layer]:
      a, b = p_new[layer][name], p_ref[layer][name]
      if name == 'bias':
        # Biases before a batch norm have a zero gradient, and a few others a near-zero one
        # (dead channels); Adam turns its float noise into steps of up to lr, in either
        # direction, in both versions alike.
        assert np.abs(a - b).max() <= 2 * 4 * 1e-3
      else:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=f'{layer}/{name}')
