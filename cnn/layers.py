"""Drop-in layers that train the CNN several times faster on XLA:CPU (figures: docs/speed.md).

Used when config.conv_impl is 'cpu_eigen', or 'auto' on the CPU backend. `Conv` is `nn.Conv` at
stride 1, with its parameters, initialisers and results. XLA:CPU hands a plain f32 convolution to
YNNPACK, several times slower here than Eigen, and YNNPACK declines one whose output or kernel is
wider than its input: so each convolution (forward, input and filter gradients, tied together by
`jax.custom_vjp`) gets a few zero columns that make it so, sliced off afterwards.

`BatchNormReluPool` is training-mode `nn.BatchNorm` -> ReLU -> 2x2 max pool in one
`jax.custom_vjp`: autodiff of the three reads and writes the full-size activation about ten times,
this block five. Like `nn.max_pool`, it gives the window's first maximum its whole gradient.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Forward convolutions with at most this many values per patch (kh*kw*C_in) run as a matmul.
IM2COL_MAX_DEPTH = 32
# Filter gradients of layers with at most CHUNK_MAX_CHANNELS input channels run in this many
# batch pieces.
FILTER_GRAD_CHUNKS = 4
CHUNK_MAX_CHANNELS = 8


def _out_size(size: int, pads: tuple[int, int], kernel: int) -> int:
  return size + pads[0] + pads[1] - kernel + 1


def _conv_eigen(lhs: jax.Array, rhs: jax.Array, pads: Pads) -> jax.Array:
  """NHWC x HWIO -> NHWC correlation, widened by zero columns so XLA:CPU picks Eigen."""
  (ph, pw) = pads
  out_w = _out_size(lhs.shape[2], pw, rhs.shape[1])
  extra = max(0, lhs.shape[2] - out_w + 1)
  if _out_size(lhs.shape[1], ph, rhs.shape[0]) > lhs.shape[1]:
    extra = 0  # already taller than the input
  y = lax.conv_general_dilated(lhs, rhs, (1, 1), (ph, (pw[0], pw[1] + extra)),
                               dimension_numbers=_NHWC)
  return y[:, :, :out_w] if extra else y


def _filter_grad(x: jax.Array, g: jax.Array, pads: Pads, kernel: tuple[int, int]) -> jax.Array:
  """d(conv(x, w))/dw contracted with g: (kh, kw, C_in, C_out).

  With few input channels (kh*kw*C_in rows) Eigen runs faster on a few images at a time.
  """
  if _kernel_exceeds(x, kernel):
    kh, kw = kernel
    patches = _patches(x, kh, kw, pads)
    dw = patches.reshape(-1, patches.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return dw.reshape(kh, kw, x.shape[-1], g.shape[-1])
  n = FILTER_GRAD_CHUNKS
  if x.shape[-1] > CHUNK_MAX_CHANNELS or x.shape[0] % n:
    return _filter_grad_eigen(x, g, pads)
  split = lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:])
  return lax.map(lambda xg: _filter_grad_eigen(*xg, pads), (split(x), split(g))).sum(0)


def _filter_grad_eigen(x: jax.Array, g: jax.Array, pads: Pads) -> jax.Array:
  """The filter gradient as one convolution that Eigen runs.

  The batch is the contracted dimension, the input channels the batch; g is the kernel, widened
  with zero columns (and x padded to match) so that YNNPACK declines it. x is padded beforehand:
  Eigen runs this large-kernel convolution 20x slower when it pads.
  """
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  extra = max(0, x.shape[2] - g.shape[2] + 1)
  if g.shape[1] > x.shape[1]:
    extra = 0
  g = jnp.pad(g, ((0, 0), (0, 0), (0, extra), (0, 0)))
  # Transposed explicitly, so the convolution is in Eigen's canonical NHWC/HWIO form even
  # inside loops, where XLA:CPU does not canonicalise it and falls back to a naive loop nest.
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                ((0, 0), (0, extra)), dimension_numbers=_NHWC)
  return dw.transpose(1, 2, 0, 3)


def _kernel_exceeds(x: jax.Array, kernel: tuple[int, int]) -> bool:
  """A kernel taller or wider than its input (a small last block under SAME padding).

  Eigen and XLA run such a convolution 50-100x slower than the patches matmul.
  """
  return kernel[0] > x.shape[1] or kernel[1] > x.shape[2]


def _patches(x: jax.Array, kh: int, kw: int, pads: Pads) -> jax.Array:
  """(B, Ho, Wo, kh*kw*C): every output position's receptive field, as shifted input copies."""
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], -1)


def _conv(x: jax.Array, w: jax.Array, pads: Pads, im2col_max_depth: int = 0) -> jax.Array:
  """The faster of the patches matmul and Eigen for this layer's shapes."""
  kh, kw, c, o = w.shape
  # Few input channels (the RGB layer's forward pass): Eigen runs at ~25 GFLOP/s there, the
  # patches matmul at ~70, and its patch copy is only kh*kw*C values per pixel.
  if kh * kw * c <= im2col_max_depth or _kernel_exceeds(x, (kh, kw)):
    # One (B*Ho*Wo, kh*kw*C) x (kh*kw*C, O) matmul of shifted input copies.
    patches = _patches(x, kh, kw, pads)
    return (patches.reshape(-1, kh * kw * c) @ w.reshape(kh * kw * c, o)).reshape(
        *patches.shape[:3], o)
  return _conv_eigen(x, w, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  """Stride-1 NHWC/HWIO convolution (cross-correlation) with explicit padding, as `nn.Conv`."""
  return _conv(x, w, pads, IM2COL_MAX_DEPTH)


def _conv2d_fwd(x, w, pads):
  return _conv(x, w, pads, IM2COL_MAX_DEPTH), (x, w)


def _conv2d_bwd(pads, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  (ph, pw) = pads
  # Input gradient: the transposed convolution, a correlation of g with the flipped kernel.
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx_pads = ((kh - 1 - ph[0], kh - 1 - ph[1]), (kw - 1 - pw[0], kw - 1 - pw[1]))
  dx = _conv(g, w_t, dx_pads)
  dw = _filter_grad(x, g, pads, (kh, kw))
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """`nn.Conv` with its default initialisers and a bias, for stride 1, no dilation, no groups."""

  features: int
  kernel_size: Sequence[int]
  padding: str = 'SAME'  # 'VALID' or 'SAME'
  dtype: Any = None
  # Return (conv(x), bias) unadded, for a `BatchNormReluPool` to absorb: the batch mean
  # cancels the bias, so adding it is a full pass over the output for nothing.
  defer_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # As `nn.Conv` resolves the padding at stride 1; plain ints, a static argument of conv2d.
    pads = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), self.padding.upper())
    y = conv2d(x, kernel, tuple((int(lo), int(hi)) for lo, hi in pads))
    if self.defer_bias:
      return y, bias
    return y + bias


# ---------------------------------------------------------------- batch norm -> ReLU -> max pool


def _windows(x: jax.Array) -> list[jax.Array]:
  """The four members of each 2x2 pooling window, row-major, each (B, H//2, W//2, C)."""
  # Strided slices, not a reshape: that would copy x whenever H or W is odd.
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return [x[:, i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)]


def _first_max(values: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Window maxima and which member (0-3) holds each.

  The first wins ties, as in select-and-scatter, the gradient of `nn.max_pool`.
  """
  best, which = values[0], jnp.zeros(values[0].shape, jnp.int8)
  for k, v in enumerate(values[1:], 1):
    more = v > best
    best, which = jnp.where(more, v, best), jnp.where(more, jnp.int8(k), which)
  return best, which


def _window_max(x: jax.Array, floor: float = -jnp.inf) -> jax.Array:
  """max(floor, the window's maximum), as a reduction (VALID: an odd last row/column drops).

  Not the elementwise maximum of `_windows(x)`: XLA:CPU would fuse that into the next layer's
  filter gradient, which reads it transposed, and recompute it there; a reduction it stores.
  """
  return lax.reduce_window(x, jnp.array(floor, x.dtype), lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID')


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`models.max_pool_2x2` with the gradient of `nn.max_pool`, in one pass each way."""
  return _pool_even(x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2])


@jax.custom_vjp
def _pool_even(x: jax.Array) -> jax.Array:
  return _window_max(x)


def _pool_even_fwd(x):
  return _window_max(x), _first_max(_windows(x))[1]


def _pool_even_bwd(which, g):
  b, h, w, c = which.shape
  return (_scatter_windows(g, which, (b, 2 * h, 2 * w, c)),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


def _bn_relu_pool_fwd(x, scale, bias, epsilon):
  # Mean and (biased) variance per channel in float32, as `nn.BatchNorm` computes them.
  x32 = x.astype(jnp.float32)
  mean = x32.mean((0, 1, 2))
  var = jnp.maximum(0.0, (x32 * x32).mean((0, 1, 2)) - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  a = scale * rstd
  b = bias - mean * a
  wins = _windows(x)
  # The normalised values are computed twice, each time fused into its one read of x: here
  # for the winners (a residual), below for the output, which must come from a reduction.
  best, which = _first_max([a * xk.astype(jnp.float32) + b for xk in wins])
  picked = functools.reduce(lambda acc, k: jnp.where(which == k, wins[k], acc), (1, 2, 3), wins[0])
  # -1: the ReLU was closed (jax.nn.relu's gradient at 0 is 0 too), nothing flows back.
  which = jnp.where(best > 0, which, jnp.int8(-1))
  y = _window_max(a * x.astype(jnp.float32) + b, floor=0.0).astype(x.dtype)  # ReLU = floor 0
  return (y, mean, var), (x, picked, which, scale, mean, rstd)


def _bn_relu_pool_bwd(epsilon, res, cotangents):
  """Batch norm's closed-form gradient, its two sums taken over the pooled winners only.

  With z = scale * xhat + bias and xhat = (x - mean) * rstd, the gradient dz reaches only the
  winners, so sum(dz) and sum(dz * xhat) are pooled-size sums, and
  dx = scale * rstd * (dz - sum(dz) / n - xhat * sum(dz * xhat) / n)
       + g_mean / n + 2 * g_var * (x - mean) / n.
  """
  del epsilon
  x, picked, which, scale, mean, rstd = res
  g, g_mean, g_var = cotangents
  n = x.shape[0] * x.shape[1] * x.shape[2]
  dz = jnp.where(which >= 0, g.astype(jnp.float32), 0.0)
  xhat = (picked.astype(jnp.float32) - mean) * rstd
  dbias = dz.sum((0, 1, 2))
  dscale = (dz * xhat).sum((0, 1, 2))
  k1 = scale * rstd
  k3 = -k1 * rstd * dscale / n + 2 * g_var / n
  k2 = -k1 * dbias / n - k3 * mean + g_mean / n
  dz_full = _scatter_windows(k1 * dz, which, x.shape)
  dx = dz_full + k3 * x.astype(jnp.float32) + k2
  return dx.astype(x.dtype), dscale, dbias


def _scatter_windows(v: jax.Array, which: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(B, H, W, C) zeros with v placed at each window's member `which`: the inverse of _windows."""
  b, h, w, c = shape
  z = jnp.zeros_like(v)
  rows = [jnp.stack([jnp.where(which == 2 * i + j, v, z) for j in (0, 1)], 3) for i in (0, 1)]
  full = jnp.stack(rows, 2).reshape(b, h // 2 * 2, w // 2 * 2, c)
  return jnp.pad(full, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bn_relu_pool(x, scale, bias, epsilon):
  """(max_pool_2x2(relu(batch_norm(x))), batch mean, batch variance), training mode.

  Reads x three times forward (statistics, winners, maxima), once backward, and writes dx.
  """
  return _bn_relu_pool_fwd(x, scale, bias, epsilon)[0]


bn_relu_pool.defvjp(_bn_relu_pool_fwd, _bn_relu_pool_bwd)


class BatchNormReluPool(nn.Module):
  """Training-mode `nn.BatchNorm` -> ReLU -> 2x2 max pool; the variables of `nn.BatchNorm`."""

  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, shift: jax.Array | None = None) -> jax.Array:
    """Normalises x + shift (a deferred conv bias, which the batch mean cancels)."""
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    y, mean, var = bn_relu_pool(x, scale, bias, self.epsilon)
    if shift is not None:
      mean = mean + shift
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
