"""Activation registry; the guided and deconvnet ReLUs for guided backprop register here too."""

from typing import Callable

import jax
import jax.numpy as jnp


@jax.custom_vjp
def guided_relu(x):
  """ReLU whose backward pass keeps g only where x > 0 and g > 0 (Springenberg et al., 2015)."""
  return jax.nn.relu(x)


def _guided_relu_fwd(x):
  return jax.nn.relu(x), x


def _guided_relu_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@jax.custom_vjp
def deconvnet_relu(x):
  """ReLU whose backward pass is relu(g), ignoring the forward input (Zeiler & Fergus, 2014)."""
  return jax.nn.relu(x)


def _deconvnet_relu_fwd(x):
  return jax.nn.relu(x), None


def _deconvnet_relu_bwd(_, g):
  return (jax.nn.relu(g),)


deconvnet_relu.defvjp(_deconvnet_relu_fwd, _deconvnet_relu_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': jax.nn.gelu,
    'silu': jax.nn.silu,
    'elu': jax.nn.elu,
    'leaky_relu': jax.nn.leaky_relu,
    'mish': jax.nn.mish,
    'tanh': jnp.tanh,
    'guided_relu': guided_relu,
    'deconvnet_relu': deconvnet_relu,
}

# Names a user may train with; the backprop-rule variants exist only for explanation.
TRAINABLE_ACTIVATIONS = tuple(n for n in ACTIVATIONS if n not in ('guided_relu', 'deconvnet_relu'))


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f'unknown activation {name!r}; choose one of {", ".join(ACTIVATIONS)}') from None
