import jax
import jax.numpy as jnp
import numpy as np

from cnn import augment


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


def test_identity_transform_returns_the_image(monkeypatch):
  monkeypatch.setattr(augment, 'ROTATION_DEGREES', 0.0)
  monkeypatch.setattr(augment, 'SHIFT_FRACTION', 0.0)
  monkeypatch.setattr(augment, 'ZOOM_RANGE', (1.0, 1.0))
  monkeypatch.setattr(augment, 'BRIGHTNESS_RANGE', (1.0, 1.0))
  x = _images()
  out = np.asarray(augment.augment(jax.random.PRNGKey(3), x))
  for i in range(4):  # each image is either itself or its mirror
    same, mirrored = np.allclose(out[i], x[i], atol=1e-5), np.allclose(out[i], x[i, :, ::-1], atol=1e-5)
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
