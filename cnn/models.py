"""The reference's CNN in Flax Linen: conv blocks, one hidden dense layer, class logits."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn import activations
from cnn import layers


# Keras' BatchNormalization epsilon, as the reference used it (its momentum is CNN.bn_momentum).
BN_EPSILON = 1e-3


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/stride-2 max pool that drops an odd last row/column, like Keras' MaxPool2D('valid').

  Its gradient goes to each window's first maximum, as `layers.max_pool_2x2`'s does, so at
  tied maxima (flat regions, nearest-fill borders) the XLA and CPU paths train alike.
  """
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def conv_filters(first_layer_filters: int, filter_org: float, conv_layers: int) -> list[int]:
  """Filters per block, `int(first_layer_filters * filter_org**i)` as in the reference."""
  return [int(first_layer_filters * filter_org**i) for i in range(conv_layers)]


class CNN(nn.Module):
  """conv -> [BN] -> act -> maxpool, x len(filters); dense -> [BN] -> act -> dropout -> logits.

  Returns logits, not the reference's softmax: the loss and `log_probabilities` normalise them,
  which is numerically safer and gives the same probabilities. Each block's post-activation
  output (before pooling) is sown under 'intermediates' as 'conv{i}_act' (a sow may not reuse
  the conv layer's own name); `block_output` reads it.
  """

  filters: tuple[int, ...]
  kernel_size: int
  dense_size: int
  num_classes: int
  padding: str = 'VALID'
  batch_norm: bool = False
  dropout: float = 0.0
  activation: str = 'relu'
  dtype: Any = jnp.float32
  # 'xla': nn.Conv; 'cpu_eigen': cnn/layers.py's convolutions, pool and fused batch norm ->
  # ReLU -> pool block (same variables and results).
  conv_impl: str = 'xla'
  # Running-average momentum of every batch norm (Keras' 0.99). Precise BN (cnn/trainer.py) runs
  # a clone with momentum 0, whose updated 'batch_stats' are then one batch's own statistics.
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = activations.get_activation(self.activation)
    x = x.astype(self.dtype)  # (B, H, W, 3) in [0, 1]
    fast = self.conv_impl == 'cpu_eigen'
    bn_args = dict(momentum=self.bn_momentum, epsilon=BN_EPSILON)
    conv = layers.Conv if fast else nn.Conv
    pool = layers.max_pool_2x2 if fast else max_pool_2x2
    # The fused block never holds the full-size activation, so it is off when that is asked for.
    fused = (fast and train and self.batch_norm and self.activation == 'relu'
             and not self.is_mutable_collection('intermediates'))
    for i, f in enumerate(self.filters):
      conv_args = dict(features=f, kernel_size=(self.kernel_size, self.kernel_size),
                       padding=self.padding, dtype=self.dtype, name=f'conv{i + 1}')
      if fused:
        y, conv_bias = layers.Conv(defer_bias=True, **conv_args)(x)
        x = layers.BatchNormReluPool(**bn_args, name=f'bn{i + 1}')(y, conv_bias)
        continue
      x = conv(**conv_args)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, **bn_args, dtype=self.dtype,
                         name=f'bn{i + 1}')(x)
      x = act(x)
      self.sow('intermediates', f'conv{i + 1}_act', x)
      x = pool(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.dense_size, dtype=self.dtype, name='dense')(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, **bn_args, dtype=self.dtype,
                       name='bn_dense')(x)
    x = act(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


def create_model(config, num_classes: int) -> CNN:
  """The CNN described by `config` (fields as in configs/default.py)."""
  return CNN(
      filters=tuple(conv_filters(config.first_layer_filters, config.filter_org,
                                 config.conv_layers)),
      kernel_size=config.kernel_size,
      dense_size=config.dense_size,
      num_classes=num_classes,
      padding=config.padding.upper(),
      batch_norm=config.batch_norm,
      dropout=config.dropout,
      activation=config.activation,
      dtype=jnp.dtype(config.dtype),
      conv_impl=resolve_conv_impl(config.get('conv_impl', 'auto')),
      bn_momentum=config.get('bn_momentum', 0.99),
  )


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' -> 'cpu_eigen' on the CPU backend (where XLA's convolutions are slow), else 'xla'."""
  if conv_impl != 'auto':
    return conv_impl
  return 'cpu_eigen' if jax.default_backend() == 'cpu' else 'xla'


@functools.cache
def _jitted_init(model: CNN):
  """One jitted init per model in a process: every run of an architecture compiles it once."""
  return jax.jit(model.init, static_argnames='train')


def init_variables(model: CNN, image_size: int, rng: jax.Array) -> dict:
  """Parameters (and batch statistics when the model has batch norm) for square RGB input."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = _jitted_init(model)(rng, dummy, train=False)
  return {k: v for k, v in variables.items() if k != 'intermediates'}


def block_output(model: CNN, variables: dict, images: jax.Array, layer: str) -> jax.Array:
  """Post-activation output of conv block `layer` ('conv1'..'convN'), (B, H', W', C), eval mode.

  Differentiable with respect to `images`, through whatever activation `model` uses.
  """
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  try:
    return state['intermediates'][f'{layer}_act'][0]
  except KeyError:
    raise ValueError(
        f'no conv block {layer!r}; the model has conv1..conv{len(model.filters)}') from None


def log_probabilities(model: CNN, variables: dict, images: jax.Array,
                      tta_flip: bool = False) -> jax.Array:
  """Inference-mode class log-probabilities of float images in [0, 1], (B, num_classes).

  With `tta_flip` the class probabilities of each image and its mirror image are averaged:
  validation, evaluate and predict all score through here, so they agree on what is reported.
  """
  def one(x):
    return jax.nn.log_softmax(model.apply(variables, x, train=False))

  if not tta_flip:
    return one(images)
  # The two passes one after the other (lax.map), not as two independent ones: XLA:CPU runs
  # those concurrently on its one thread pool, slower than in turn (docs/speed.md), and in turn
  # they need one pass's memory.
  both = jax.lax.map(one, jnp.stack([images, images[:, :, ::-1]]))
  return jnp.logaddexp(both[0], both[1]) - jnp.log(2.0)


def count_parameters(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
