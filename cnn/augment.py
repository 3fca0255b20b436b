"""On-device augmentation: the reference's Keras ImageDataGenerator transforms, in pure JAX.

Flip, rotation, shift, per-axis zoom and brightness with 'nearest' fill, at the reference's
ranges (`REFERENCE`), plus an optional random-resized crop in the same warp and random erasing
(Zhong et al., 2020). The ranges are config fields (`aug_*`) traced by the train step, so runs
that differ only in augmentation share one compiled step. Pure: the same key gives the same
images, so a resumed run repeats its augmentations.
"""

import math

import jax
import jax.numpy as jnp

# The reference's ranges; configs/default.py's aug_* fields default to these.
REFERENCE = {'flip': 1.0, 'rotation': 20.0, 'shift': 0.2, 'zoom': 0.2, 'brightness': 0.2,
             'crop_min_scale': 1.0, 'erase': 0.0}
_LOG_MAX_RATIO = math.log(4 / 3)
# Random erasing's ranges, Zhong et al.'s: the erased share of the area, and log(height / width).
_ERASE_AREA = (0.02, 1 / 3)
_LOG_MAX_ERASE_RATIO = math.log(1 / 0.3)


def ranges_from_config(config) -> dict[str, float]:
  """The aug_* fields as augment()'s `ranges` (plain floats; the train step traces them)."""
  return {name: float(config.get(f'aug_{name}', default)) for name, default in REFERENCE.items()}


def _crop_window(key: jax.Array, crop_min_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(size, centre offset) of a random crop as fractions of the side, each (2,) rows/cols."""
  k_area, k_ratio, k_pos = jax.random.split(key, 3)
  area = jax.random.uniform(k_area, (), minval=crop_min_scale, maxval=1.0)
  on = crop_min_scale < 1.0  # no crop: the whole image, aspect ratio 1
  log_ratio = jnp.where(on, jax.random.uniform(k_ratio, (), minval=-_LOG_MAX_RATIO,
                                               maxval=_LOG_MAX_RATIO), 0.0)
  ratio = jnp.exp(log_ratio)  # width / height
  size = jnp.minimum(jnp.sqrt(area) * jnp.stack([1 / jnp.sqrt(ratio), jnp.sqrt(ratio)]), 1.0)
  offset = jax.random.uniform(k_pos, (2,), minval=-0.5, maxval=0.5) * (1.0 - size)
  return size, offset


def _sample_grid(key: jax.Array, shape: tuple[int, int],
                 ranges: dict) -> tuple[jax.Array, jax.Array]:
  """Input coordinates (rows, cols) that each output pixel reads, each (H, W)."""
  height, width = shape
  k_flip, k_rot, k_shift, k_zoom, k_crop = jax.random.split(key, 5)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-1.0, maxval=1.0) * ranges['rotation'])
  shift = jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0) * ranges['shift']
  zoom = 1.0 + jax.random.uniform(k_zoom, (2,), minval=-1.0, maxval=1.0) * ranges['zoom']
  flip = jax.random.bernoulli(k_flip, 0.5 * ranges['flip'])
  crop, crop_offset = _crop_window(k_crop, ranges['crop_min_scale'])
  zoom, shift = zoom * crop, shift + crop_offset

  cy, cx = (height - 1) / 2, (width - 1) / 2
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                            jnp.arange(width, dtype=jnp.float32) - cx, indexing='ij')
  cols = jnp.where(flip, -cols, cols)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_r = zoom[0] * (cos * rows - sin * cols) + cy + shift[0] * height
  src_c = zoom[1] * (sin * rows + cos * cols) + cx + shift[1] * width
  return src_r, src_c


def _erase(key: jax.Array, image: jax.Array, prob: jax.Array) -> jax.Array:
  """With probability `prob`, a random rectangle of `image` (H, W, C) set to its mean colour."""
  h, w, _ = image.shape
  k_on, k_area, k_ratio, k_pos = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=_ERASE_AREA[0], maxval=_ERASE_AREA[1]) * h * w
  ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=-_LOG_MAX_ERASE_RATIO,
                                     maxval=_LOG_MAX_ERASE_RATIO))
  sides = jnp.array([h, w], jnp.float32)
  size = jnp.minimum(jnp.sqrt(area * jnp.stack([ratio, 1 / ratio])), sides)
  top, left = jax.random.uniform(k_pos, (2,)) * (sides - size)
  rows, cols = jnp.arange(h), jnp.arange(w)
  inside = (((rows >= top) & (rows < top + size[0]))[:, None]
            & ((cols >= left) & (cols < left + size[1]))[None, :])
  erased = inside & jax.random.bernoulli(k_on, prob)
  return jnp.where(erased[..., None], image.mean((0, 1)), image)


def _augment_one(key: jax.Array, image: jax.Array, ranges: dict, erase: bool) -> jax.Array:
  k_geo, k_bright = jax.random.split(key)
  # Not a third member of that split, which would change the other two streams: split(key)[i]
  # is fold_in(key, i), so 2 is a key of its own.
  k_erase = jax.random.fold_in(key, 2)
  h, w, _ = image.shape
  src_r, src_c = _sample_grid(k_geo, (h, w), ranges)
  warp = lambda channel: jax.scipy.ndimage.map_coordinates(
      channel, [src_r, src_c], order=1, mode='nearest')
  out = jax.vmap(warp, in_axes=2, out_axes=2)(image)
  jitter = jax.random.uniform(k_bright, (), minval=-1.0, maxval=1.0)
  brightness = 1.0 + jitter * ranges['brightness']
  out = jnp.clip(out * brightness, 0.0, 1.0)
  return _erase(k_erase, out, ranges['erase']) if erase else out


def augment(key: jax.Array, images: jax.Array, ranges: dict | None = None,
            erase: bool = True) -> jax.Array:
  """(B, H, W, C) float in [0, 1] -> same shape, each image with its own random transform.

  `ranges` maps REFERENCE's names to (traced) scalars; None means the reference's.
  `erase=False` leaves random erasing out of the program, for runs that never apply it.
  """
  ranges = REFERENCE if ranges is None else ranges
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, image: _augment_one(k, image, ranges, erase))(keys, images)
