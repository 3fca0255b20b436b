"""On-device augmentation, as the reference's Keras ImageDataGenerator did on the host.

Random horizontal flip, rotation up to +-20 degrees, shifts up to +-20% of each side, zoom in
[0.8, 1.2] per axis and brightness in [0.8, 1.2], with 'nearest' fill at the borders. Pure:
the same key gives the same images, so a resumed run repeats its augmentations exactly.
"""

import jax
import jax.numpy as jnp

ROTATION_DEGREES = 20.0
SHIFT_FRACTION = 0.2
ZOOM_RANGE = (0.8, 1.2)
BRIGHTNESS_RANGE = (0.8, 1.2)


def _sample_grid(key: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Input coordinates (rows, cols) that each output pixel reads, each (H, W)."""
  k_flip, k_rot, k_shift, k_zoom = jax.random.split(key, 4)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-ROTATION_DEGREES,
                                         maxval=ROTATION_DEGREES))
  shift = jax.random.uniform(k_shift, (2,), minval=-SHIFT_FRACTION, maxval=SHIFT_FRACTION)
  zoom = jax.random.uniform(k_zoom, (2,), minval=ZOOM_RANGE[0], maxval=ZOOM_RANGE[1])
  flip = jax.random.bernoulli(k_flip)

  cy, cx = (height - 1) / 2, (width - 1) / 2
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                            jnp.arange(width, dtype=jnp.float32) - cx, indexing='ij')
  cols = jnp.where(flip, -cols, cols)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_r = zoom[0] * (cos * rows - sin * cols) + cy + shift[0] * height
  src_c = zoom[1] * (sin * rows + cos * cols) + cx + shift[1] * width
  return src_r, src_c


def _augment_one(key: jax.Array, image: jax.Array) -> jax.Array:
  k_geo, k_bright = jax.random.split(key)
  h, w, _ = image.shape
  src_r, src_c = _sample_grid(k_geo, h, w)
  warp = lambda channel: jax.scipy.ndimage.map_coordinates(
      channel, [src_r, src_c], order=1, mode='nearest')
  out = jax.vmap(warp, in_axes=2, out_axes=2)(image)
  brightness = jax.random.uniform(k_bright, (), minval=BRIGHTNESS_RANGE[0],
                                  maxval=BRIGHTNESS_RANGE[1])
  return jnp.clip(out * brightness, 0.0, 1.0)


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """(B, H, W, C) float in [0, 1] -> same shape, each image with its own random transform."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(_augment_one)(keys, images)
