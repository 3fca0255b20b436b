"""The activation registry and the custom_vjp guided and deconvnet ReLUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import activations
from cnn.activations import deconvnet_relu, guided_relu


def _inputs_with_zeros(seed: int, shape=(6, 7)) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  # Exact zeros in both x and g are where a sloppy mask (>= instead of >) would differ.
  x.flat[::5] = 0.0
  g.flat[::7] = 0.0
  return jnp.asarray(x), jnp.asarray(g)


@pytest.mark.parametrize('fn', [guided_relu, deconvnet_relu])
def test_forward_is_relu(fn):
  x, _ = _inputs_with_zeros(0)
  np.testing.assert_array_equal(fn(x), jax.nn.relu(x))
  np.testing.assert_array_equal(jax.jit(fn)(x), jax.nn.relu(x))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_guided_vjp_masks_by_input_and_gradient(seed):
  x, g = _inputs_with_zeros(seed)
  y, vjp = jax.vjp(guided_relu, x)
  (dx,) = vjp(g)
  xn, gn = np.asarray(x), np.asarray(g)
  np.testing.assert_array_equal(y, np.maximum(xn, 0))
  np.testing.assert_array_equal(dx, gn * (xn > 0) * (gn > 0))
  # The rule must really differ from both the true gradient and deconvnet on these inputs.
  (dx_plain,) = jax.vjp(jax.nn.relu, x)[1](g)
  (dx_deconv,) = jax.vjp(deconvnet_relu, x)[1](g)
  assert not np.array_equal(dx, dx_plain)
  assert not np.array_equal(dx, dx_deconv)


@pytest.mark.parametrize('seed', [0, 1])
def test_deconvnet_vjp_ignores_forward_input(seed):
  x, g = _inputs_with_zeros(seed)
  (dx,) = jax.vjp(deconvnet_relu, x)[1](g)
  np.testing.assert_array_equal(dx, np.maximum(np.asarray(g), 0))


def test_plain_relu_gradient_at_zero_is_zero():
  # The vanilla rule used for comparison is g * (x > 0); pin JAX's choice at x == 0.
  (dx,) = jax.vjp(jax.nn.relu, jnp.zeros(3))[1](jnp.ones(3))
  np.testing.assert_array_equal(dx, np.zeros(3))


def test_guided_relu_under_jit_vmap_and_grad():
  x, g = _inputs_with_zeros(3)
  # grad of a sum: the incoming gradient is all ones (> 0), so only the forward mask remains.
  grad_sum = jax.jit(jax.grad(lambda v: guided_relu(v).sum()))
  np.testing.assert_array_equal(grad_sum(x), (np.asarray(x) > 0).astype(np.float32))
  # vmap of a VJP per row, with per-row cotangents, equals the elementwise rule.
  def row_vjp(xr, gr):
    return jax.vjp(guided_relu, xr)[1](gr)[0]
  got = jax.jit(jax.vmap(row_vjp))(x, g)
  xn, gn = np.asarray(x), np.asarray(g)
  np.testing.assert_array_equal(got, gn * (xn > 0) * (gn > 0))
  # vmap of grad of a weighted sum: the weights are the incoming gradient.
  w = jnp.asarray(np.random.default_rng(4).normal(size=x.shape[1]).astype(np.float32))
  got = jax.vmap(jax.grad(lambda xr: (guided_relu(xr) * w).sum()))(x)
  wn = np.asarray(w)[None]
  np.testing.assert_array_equal(got, wn * (xn > 0) * (wn > 0))


def test_hand_derived_two_layer_network():
  """y = v . act(W act(x)); gradients by hand for the three rules.

  x = (1, -2): act(x) = (1, 0). W = [[1, 1], [-1, 3]]: pre = (1, -1), act = (1, 0).
  v = (-2, 1): y = -2.
  dy/dh2 = v = (-2, 1). Second ReLU, input (1, -1):
    vanilla g*(x>0) = (-2, 0); guided also needs g>0 -> (0, 0); deconvnet relu(g) = (0, 1).
  Through W^T: vanilla (-2, -2), guided (0, 0), deconvnet (-1, 3).
  First ReLU, input (1, -2):
    vanilla (-2, 0); guided (0, 0); deconvnet relu -> (0, 3).
  """
  x = jnp.array([1.0, -2.0])
  w = jnp.array([[1.0, 1.0], [-1.0, 3.0]])
  v = jnp.array([-2.0, 1.0])

  def net(act):
    return lambda x: v @ act(w @ act(x))

  assert float(net(guided_relu)(x)) == -2.0
  np.testing.assert_array_equal(jax.grad(net(jax.nn.relu))(x), [-2.0, 0.0])
  np.testing.assert_array_equal(jax.grad(net(guided_relu))(x), [0.0, 0.0])
  np.testing.assert_array_equal(jax.grad(net(deconvnet_relu))(x), [0.0, 3.0])

  # With v = (2, 1) every upstream gradient is positive where the input is: guided = vanilla,
  # while deconvnet still leaks gradient through the inactive units.
  v = jnp.array([2.0, 1.0])  # dy/dh2 = (2, 1) -> vanilla (2, 0) -> W^T (2, 2) -> (2, 0)
  np.testing.assert_array_equal(jax.grad(net(jax.nn.relu))(x), [2.0, 0.0])
  np.testing.assert_array_equal(jax.grad(net(guided_relu))(x), [2.0, 0.0])
  # deconvnet: relu(2, 1) = (2, 1) -> W^T (1, 5) -> relu (1, 5).
  np.testing.assert_array_equal(jax.grad(net(deconvnet_relu))(x), [1.0, 5.0])


def _numpy_mlp_grads(x, weights, v):
  """Forward and the three backward rules of v . relu(W_L ... relu(W_1 x)), in NumPy."""
  pres, h = [], x
  for w in weights:
    pres.append(w @ h)
    h = np.maximum(pres[-1], 0)
  out = {}
  for rule in ('vanilla', 'guided', 'deconvnet'):
    g = v.copy()
    for w, pre in zip(reversed(weights), reversed(pres)):
      if rule == 'vanilla':
        g = g * (pre > 0)
      elif rule == 'guided':
        g = g * (pre > 0) * (g > 0)
      else:
        g = np.maximum(g, 0)
      g = w.T @ g
    out[rule] = g
  return out


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_random_mlp_matches_numpy_rules(seed):
  rng = np.random.default_rng(seed)
  sizes = [5, 8, 6, 4]
  weights = [rng.normal(size=(m, n)) for n, m in zip(sizes[:-1], sizes[1:])]
  x, v = rng.normal(size=sizes[0]), rng.normal(size=sizes[-1])
  want = _numpy_mlp_grads(x, weights, v)

  def net(act):
    def f(x):
      h = x
      for w in weights:
        h = act(jnp.asarray(w, jnp.float32) @ h)
      return jnp.asarray(v, jnp.float32) @ h
    return jax.jit(jax.grad(f))

  x32 = jnp.asarray(x, jnp.float32)
  got = {'vanilla': net(jax.nn.relu)(x32), 'guided': net(guided_relu)(x32),
         'deconvnet': net(deconvnet_relu)(x32)}
  for rule in want:
    np.testing.assert_allclose(got[rule], want[rule], rtol=1e-5, atol=1e-5)


def test_registry():
  for name in activations.ACTIVATIONS:
    assert activations.get_activation(name) is activations.ACTIVATIONS[name]
  assert activations.get_activation('guided_relu') is guided_relu
  assert 'guided_relu' not in activations.TRAINABLE_ACTIVATIONS
  assert 'deconvnet_relu' not in activations.TRAINABLE_ACTIVATIONS
  assert 'relu' in activations.TRAINABLE_ACTIVATIONS
  with pytest.raises(ValueError, match='unknown activation'):
    activations.get_activation('swish2')
