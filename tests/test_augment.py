import jax
import jax.numpy as jnp
import numpy as np

from cnn import augment


# Every transform off: what each test then turns on is all that acts.
_NONE = dict(augment.REFERENCE, flip=0.0, rotation=0.0, shift=0.0, zoom=0.0, brightness=0.0)


def _images():
  # NumPy's generator: jax.random would compile a threefry program for this shape (seconds).
  return jnp.asarray(np.random.default_rng(0).uniform(size=(4, 24, 24, 3)), jnp.float32)


def test_same_key_same_images_and_keys_differ():
  x = _images()
  a = augment.augment(jax.random.PRNGKey(1), x)
  b = augment.augment(jax.random.PRNGKey(1), x)
  c = augment.augment(jax.random.PRNGKey(2), x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1


def test_identity_transform_returns_the_image():
  ranges = dict(augment.REFERENCE, rotation=0.0, shift=0.0, zoom=0.0, brightness=0.0)
  x = _images()
  out = np.asarray(augment.augment(jax.random.PRNGKey(3), x, ranges))
  for i in range(4):  # each image is either itself or its mirror
    same = np.allclose(out[i], x[i], atol=1e-5)
    mirrored = np.allclose(out[i], x[i, :, ::-1], atol=1e-5)
    assert same or mirrored


def test_flip_and_brightness_statistics():
  x = jnp.tile(jnp.linspace(0, 1, 24)[None, None, :, None], (256, 24, 1, 3)) * 0.5
  out = np.asarray(augment.augment(jax.random.PRNGKey(4), x))
  # A left-to-right ramp: flipped images get brighter on the left. About half are flipped.
  flipped = (out[:, 12, :4].mean((1, 2)) > out[:, 12, -4:].mean((1, 2)))
  assert 0.35 < flipped.mean() < 0.65
  # On a flat grey image only brightness acts: a factor in [0.8, 1.2] per image.
  grey = augment.augment(jax.random.PRNGKey(5), jnp.full((256, 8, 8, 3), 0.5))
  ratio = np.asarray(grey).reshape(256, -1) / 0.5
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)
  assert 0.8 <= ratio.min() and ratio.max() <= 1.2 and ratio[:, 0].std() > 0.08


def test_ranges_are_traced_values_of_one_compiled_function():
  x = _images()
  traces = []

  @jax.jit
  def run(ranges):
    traces.append(1)
    return augment.augment(jax.random.PRNGKey(6), x, ranges)

  np.testing.assert_allclose(run(_NONE), x, atol=1e-5)  # every range 0: the identity
  strong = dict(_NONE, rotation=45.0)
  assert not np.allclose(run(strong), x, atol=1e-2)
  assert len(traces) == 1


def test_random_resized_crop_zooms_into_part_of_the_image():
  # A horizontal ramp: a crop of a fraction of the width spans less of the ramp's range.
  x = jnp.tile(jnp.linspace(0, 1, 32)[None, None, :, None], (64, 32, 1, 3))
  whole = np.asarray(augment.augment(jax.random.PRNGKey(7), x, _NONE))
  cropped = np.asarray(augment.augment(jax.random.PRNGKey(7), x, dict(_NONE, crop_min_scale=0.25)))
  span = lambda a: a[:, 16, -1, 0] - a[:, 16, 0, 0]
  np.testing.assert_allclose(span(whole), 1.0, atol=1e-5)
  assert span(cropped).max() < 1.0 + 1e-5 and span(cropped).mean() < 0.85
  # The narrowest crop allowed: area 1/4 at aspect ratio 3/4, sqrt(1/4 * 3/4) = 0.43 of the width.
  assert span(cropped).min() > 0.42


def test_random_erasing_fills_one_rectangle_of_each_chosen_image_with_its_mean_colour():
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(128, 30, 36, 3)), jnp.float32)
  kept = np.asarray(augment.augment(jax.random.PRNGKey(8), x, _NONE))
  erased = np.asarray(augment.augment(jax.random.PRNGKey(8), x, dict(_NONE, erase=0.5)))
  changed = np.abs(erased - kept).max(-1) > 0  # (B, H, W)
  chosen = changed.any((1, 2))
  assert 0.35 < chosen.mean() < 0.65
  for i in np.flatnonzero(chosen):
    rows, cols = np.flatnonzero(changed[i].any(1)), np.flatnonzero(changed[i].any(0))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert changed[i].sum() == box  # one filled rectangle
    assert 0.015 < box / (30 * 36) < 0.36  # 2-33% of the area, up to whole pixels
    np.testing.assert_allclose(erased[i][changed[i]], np.broadcast_to(
        kept[i].mean((0, 1)), (box, 3)), rtol=1e-5)
  np.testing.assert_array_equal(erased[~chosen], kept[~chosen])
