"""Guided backprop against an independent NumPy CNN, receptive fields, Grad-CAM, the mode."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from cnn import guided_backprop as gb
from cnn import figures
from cnn import models

RULES = ('vanilla', 'guided', 'deconvnet')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- An independent NumPy implementation of the CNN and the three backward rules. -----------

def _np_conv(x, kernel, bias, padding):
  """Cross-correlation of (H, W, Ci) with (k, k, Ci, Co), stride 1, as XLA pads SAME."""
  k = kernel.shape[0]
  lo = (k - 1) // 2 if padding == 'SAME' else 0
  if padding == 'SAME':
    x = np.pad(x, ((lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
  h, w = x.shape[0] - k + 1, x.shape[1] - k + 1
  out = np.zeros((h, w, kernel.shape[3]))
  for a in range(k):
    for b in range(k):
      out += x[a:a + h, b:b + w] @ kernel[a, b]
  return out + bias, (x.shape, lo)


def _np_conv_back(g, kernel, padded, in_shape):
  """Input gradient of `_np_conv`: each output's gradient spread back over its k x k taps."""
  (padded_shape, lo), k = padded, kernel.shape[0]
  h, w = g.shape[:2]
  dx = np.zeros(padded_shape)
  for a in range(k):
    for b in range(k):
      dx[a:a + h, b:b + w] += g @ kernel[a, b].T
  return dx[lo:lo + in_shape[0], lo:lo + in_shape[1]]


def _np_pool(x):
  h, w = x.shape[0] // 2, x.shape[1] // 2
  return x[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).max(axis=(1, 3))


def _np_pool_back(g, x):
  """Max-pool gradient: each window's first maximum (row-major) takes it all, as nn.max_pool's
  select-and-scatter and layers.max_pool_2x2 both do."""
  h, w = g.shape[:2]
  win = x[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).transpose(0, 2, 1, 3, 4).reshape(h, w, 4, -1)
  first = np.argmax(win, axis=2)  # argmax returns the first of tied maxima
  share = (np.arange(4)[None, None, :, None] == first[:, :, None]) * g[:, :, None]
  dx = np.zeros_like(x)
  dx[:2 * h, :2 * w] = share.reshape(h, w, 2, 2, -1).transpose(0, 2, 1, 3, 4).reshape(
      2 * h, 2 * w, -1)
  return dx


def _np_relu_back(g, pre, rule):
  if rule == 'vanilla':
    return g * (pre > 0)
  if rule == 'guided':
    return g * (pre > 0) * (g > 0)
  return np.maximum(g, 0)


def _np_bn(x, p, s):
  return (x - s['mean']) / np.sqrt(s['var'] + 1e-3) * p['scale'] + p['bias']


def _np_bn_scale(p, s):
  return p['scale'] / np.sqrt(s['var'] + 1e-3)


class NumpyCNN:
  """models.CNN's forward (inference) and backward under each rule, written from the math."""

  def __init__(self, variables, num_blocks, padding, batch_norm):
    self.p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
    self.s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables.get('batch_stats', {}))
    self.n, self.padding, self.bn = num_blocks, padding, batch_norm

  def forward(self, image):
    self.cache, x = [], np.asarray(image, np.float64)
    for i in range(1, self.n + 1):
      conv = self.p[f'conv{i}']
      pre, padded = _np_conv(x, conv['kernel'], conv['bias'], self.padding)
      if self.bn:
        pre = _np_bn(pre, self.p[f'bn{i}'], self.s[f'bn{i}'])
      act = np.maximum(pre, 0)
      self.cache.append((x.shape, padded, pre, act))
      x = _np_pool(act)
    self.flat_shape = x.shape
    h = x.reshape(-1) @ self.p['dense']['kernel'] + self.p['dense']['bias']
    if self.bn:
      h = _np_bn(h, self.p['bn_dense'], self.s['bn_dense'])
    self.dense_pre = h
    return np.maximum(h, 0) @ self.p['logits']['kernel'] + self.p['logits']['bias']

  def block_output(self, i):
    return self.cache[i - 1][3]

  def backward_from_block(self, i, g, rule):
    """d/d(image) of sum(g * block i's post-activation output).

    Also sets `self.leaked`: whether a positive gradient reached a unit that was off
    (pre <= 0), the only place where the deconvnet and guided rules differ.
    """
    self.leaked = False
    for j in range(i, 0, -1):
      in_shape, padded, pre, act = self.cache[j - 1]
      if j < i:
        g = _np_pool_back(g, act)
      self.leaked |= bool(np.any((g > 0) & (pre <= 0)))
      g = _np_relu_back(g, pre, rule)
      if self.bn:
        g = g * _np_bn_scale(self.p[f'bn{j}'], self.s[f'bn{j}'])
      g = _np_conv_back(g, self.p[f'conv{j}']['kernel'], padded, in_shape)
    return g

  def backward_from_logit(self, c, rule):
    g = self.p['logits']['kernel'][:, c]
    g = _np_relu_back(g, self.dense_pre, rule)
    if self.bn:
      g = g * _np_bn_scale(self.p['bn_dense'], self.s['bn_dense'])
    g = (self.p['dense']['kernel'] @ g).reshape(self.flat_shape)
    g = _np_pool_back(g, self.block_output(self.n))
    return self.backward_from_block(self.n, g, rule)


def _tiny_model(padding='VALID', batch_norm=False, activation='relu', filters=(3, 4)):
  return models.CNN(filters=filters, kernel_size=3, dense_size=6, num_classes=3,
                    padding=padding, batch_norm=batch_norm, activation=activation)


def _variables(model, image_size, seed, batch_norm=False):
  variables = models.init_variables(model, image_size, jax.random.key(seed))
  if batch_norm:  # non-trivial running statistics, so that inference BN is really exercised
    rng = np.random.default_rng(seed)
    variables['batch_stats'] = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if path[-1].key == 'var'
                                    else rng.normal(0, 0.1, a.shape), jnp.float32),
        variables['batch_stats'])
    variables['params'] = {
        k: ({'scale': jnp.asarray(rng.uniform(0.5, 1.5, v['scale'].shape), jnp.float32),
             'bias': jnp.asarray(rng.normal(0, 0.1, v['bias'].shape), jnp.float32)}
            if k.startswith('bn') else v) for k, v in variables['params'].items()}
  return variables


def _image(size, seed):
  return jax.random.uniform(jax.random.key(100 + seed), (size, size, 3))


# --- Neuron gradients against the NumPy reference. --------------------------------------------

@pytest.mark.parametrize('padding,batch_norm,seed', [('VALID', False, 0), ('SAME', False, 1),
                                                      ('VALID', True, 3)])
def test_neuron_gradients_match_numpy_rules(padding, batch_norm, seed):
  model = _tiny_model(padding, batch_norm)
  variables = _variables(model, 14, seed, batch_norm)
  image = _image(14, seed)
  ref = NumpyCNN(variables, 2, padding, batch_norm)
  ref.forward(np.asarray(image))
  acts = np.asarray(gb.layer_activations(model, variables, image, 'conv2'))
  np.testing.assert_allclose(acts, ref.block_output(2), rtol=1e-4, atol=1e-5)

  # Every channel at its peak, plus one silent neuron.
  neurons = gb.choose_neurons(acts, 10)
  silent = np.argwhere(ref.block_output(2) <= 0)
  assert len(silent)
  r, c, ch = silent[0]
  neurons = gb.Neurons(*(np.append(a, v) for a, v in zip(neurons, (ch, r, c, 0.0))))
  got = {rule: gb.neuron_gradients(model, variables, image, 'conv2', neurons, rule)
         for rule in RULES}
  leaked = []
  for k, (ch, r, c) in enumerate(zip(neurons.channels, neurons.rows, neurons.cols)):
    onehot = np.zeros(ref.block_output(2).shape)
    onehot[r, c, ch] = 1.0
    for rule in RULES:
      want = ref.backward_from_block(2, onehot, rule)
      np.testing.assert_allclose(got[rule][k], want, rtol=1e-4, atol=1e-6,
                                 err_msg=f'{rule} neuron {k}')
    leaked.append(ref.leaked)
  active = neurons.values > 0
  assert active.sum() >= 2
  # Where the math says the rules differ, they do. Guided drops the negative gradients that
  # vanilla keeps on active units; deconvnet differs from guided exactly for the neurons whose
  # backward pass sends a positive gradient into a unit that was off.
  for k in range(len(neurons.channels)):
    if active[k]:
      assert np.abs(got['guided'][k]).sum() > 0
      assert not np.allclose(got['guided'][k], got['vanilla'][k])
    assert np.array_equal(got['guided'][k], got['deconvnet'][k]) == (not leaked[k]), k
  # A silent neuron: no true or guided gradient, but deconvnet still paints a pattern.
  assert not active[-1] and leaked[-1]
  assert np.all(got['guided'][-1] == 0) and np.all(got['vanilla'][-1] == 0)
  assert np.abs(got['deconvnet'][-1]).sum() > 0


def test_neuron_gradients_are_one_vmapped_jit_call():
  model = _tiny_model()
  variables = _variables(model, 14, 0)
  image = _image(14, 0)
  acts = np.asarray(gb.layer_activations(model, variables, image, 'conv2'))
  neurons = gb.choose_neurons(acts, 4)
  before = gb._neuron_gradients._cache_size()
  gb.neuron_gradients(model, variables, image, 'conv2', neurons, 'guided')
  gb.neuron_gradients(model, variables, image + 0.1, 'conv2', neurons._replace(
      rows=neurons.rows[::-1].copy()), 'guided')
  # One compiled program for both calls: the neuron indices are traced, not baked in.
  assert gb._neuron_gradients._cache_size() == before + 1


def test_non_relu_models_refuse_guided_and_deconvnet():
  model = _tiny_model(activation='gelu')
  with pytest.raises(ValueError, match="defined for ReLU networks only.*'gelu'"):
    gb.backprop_model(model, 'guided')
  with pytest.raises(ValueError, match='ReLU networks only'):
    gb.backprop_model(model, 'deconvnet')
  assert gb.backprop_model(model, 'vanilla') is model  # the true gradient of gelu
  with pytest.raises(ValueError, match='unknown guided_bp_method'):
    gb.backprop_model(_tiny_model(), 'smoothgrad')
  relu = _tiny_model()
  assert gb.backprop_model(relu, 'guided').activation == 'guided_relu'
  assert gb.backprop_model(relu, 'deconvnet').activation == 'deconvnet_relu'
  assert gb.backprop_model(relu, 'vanilla').activation == 'relu'


def test_layer_name_is_checked():
  with pytest.raises(ValueError, match='conv1..conv2'):
    gb.layer_index('conv5', 2)
  with pytest.raises(ValueError, match='conv1..conv2'):
    gb.layer_index('dense', 2)
  assert gb.layer_index('conv2', 2) == 2


# --- Neuron choice. ------------------------------------------------------------------------------

def test_choose_neurons_picks_most_active_channels_at_their_peaks():
  rng = np.random.default_rng(0)
  acts = rng.uniform(0, 1, size=(4, 5, 12)).astype(np.float32)
  peaks = {3: (2, 4, 9.0), 7: (0, 0, 8.0), 1: (3, 1, 7.0), 11: (1, 2, 6.5)}
  for ch, (r, c, v) in peaks.items():
    acts[r, c, ch] = v
  acts[..., 5] = 0.0  # a silent channel is never among the top ones here
  n = gb.choose_neurons(acts, 4)
  np.testing.assert_array_equal(n.channels, [3, 7, 1, 11])
  np.testing.assert_array_equal(n.rows, [2, 0, 3, 1])
  np.testing.assert_array_equal(n.cols, [4, 0, 1, 2])
  np.testing.assert_array_equal(n.values, [9.0, 8.0, 7.0, 6.5])
  n10 = gb.choose_neurons(acts, 10)
  assert len(n10.channels) == 10 and 5 not in n10.channels
  assert np.all(np.diff(n10.values) <= 0)
  assert len(gb.choose_neurons(acts, 50).channels) == 12  # capped at the layer's width

  given = gb.choose_neurons(acts, 10, channels=(11, 5))
  np.testing.assert_array_equal(given.channels, [11, 5])
  np.testing.assert_array_equal([given.rows[0], given.cols[0]], [1, 2])
  assert given.values[1] == 0.0
  with pytest.raises(ValueError, match='out of range'):
    gb.choose_neurons(acts, 10, channels=(12,))


# --- Receptive fields. ---------------------------------------------------------------------------

def _positive_model(padding, kernel_size, blocks):
  return models.CNN(filters=(2,) * blocks, kernel_size=kernel_size, dense_size=2,
                    num_classes=2, padding=padding)


def _positive_variables(model, size):
  variables = models.init_variables(model, size, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (jnp.abs(a) + 0.1 if path[-1].key == 'kernel' else jnp.zeros_like(a)),
      variables['params'])
  return {'params': params}


@pytest.mark.parametrize('padding,kernel_size,blocks,size', [
    ('VALID', 3, 1, 9), ('VALID', 3, 2, 16), ('VALID', 3, 3, 30), ('VALID', 5, 2, 22),
    ('SAME', 3, 2, 12), ('SAME', 3, 3, 20), ('SAME', 4, 2, 13), ('SAME', 5, 3, 17)])
def test_receptive_field_matches_empirical_support(padding, kernel_size, blocks, size):
  """Positive weights, zero biases: neuron (i, j) > 0 on a one-pixel image iff it sees it."""
  model = _positive_model(padding, kernel_size, blocks)
  variables = _positive_variables(model, size)
  deltas = jnp.eye(size * size).reshape(size * size, size, size, 1) * jnp.ones(3)
  acts = jax.jit(models.block_output, static_argnums=(0, 3))(model, variables, deltas,
                                                             f'conv{blocks}')
  seen = np.asarray(acts)[..., 0] > 0  # (pixels, h, w)
  seen = seen.reshape(size, size, *seen.shape[1:])
  rf = gb.receptive_field(blocks, kernel_size, padding)
  for i in range(seen.shape[2]):
    for j in range(seen.shape[3]):
      want = np.zeros((size, size), bool)
      (top, bottom), (left, right) = rf.span(i, size), rf.span(j, size)
      want[top:bottom, left:right] = True
      np.testing.assert_array_equal(seen[:, :, i, j], want, err_msg=f'neuron ({i}, {j})')


def test_receptive_field_of_the_reference_network():
  # Five VALID 3x3 blocks: 3, 4, 8, 10, 18, 22, 38, 46, 78 pixels; jump 16.
  assert gb.receptive_field(5, 3, 'VALID') == gb.ReceptiveField(size=78, jump=16, start=0)
  assert gb.receptive_field(5, 3, 'SAME') == gb.ReceptiveField(size=78, jump=16, start=-31)


def test_vanilla_gradient_support_is_the_receptive_field():
  """Uniform positive weights: every ReLU passes, and a linear ramp stays a ramp through every
  block, so each max-pool window sends its gradient to the corner the ramp rises to. The four
  ramps (up or down in rows and in columns) reach the receptive field's four corners; together
  they reach every pixel the neuron sees, and no other."""
  size, blocks = 30, 3
  model = _positive_model('VALID', 3, blocks)
  variables = _positive_variables(model, size)
  variables['params'] = jax.tree.map(lambda a: jnp.where(a > 0, 1.0, 0.0), variables['params'])
  r, c = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  images = [np.repeat((0.5 + 0.01 * (dr * r + dc * c))[..., None], 3, -1).astype(np.float32)
            for dr in (1, -1) for dc in (1, -1)]
  acts = np.asarray(gb.layer_activations(model, variables, images[0], 'conv3'))
  h, w = acts.shape[:2]
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  neurons = gb.Neurons(np.zeros(h * w, np.int32), rows.ravel(), cols.ravel(), acts[..., 0].ravel())
  reached = sum(np.abs(np.asarray(gb.neuron_gradients(model, variables, jnp.asarray(image),
                                                      'conv3', neurons, 'vanilla'))).sum(-1) > 0
                for image in images)
  boxes = gb.neuron_boxes(model, 'conv3', neurons, (size, size))
  for got, (top, left, bottom, right) in zip(reached, boxes):
    want = np.zeros((size, size), bool)
    want[top:bottom, left:right] = True
    np.testing.assert_array_equal(got > 0, want)


# --- Grad-CAM. -----------------------------------------------------------------------------------

def _class_score(params, a, c):
  """Logit `c` of the layers after conv2's activation `a` of the 2-block model, by hand."""
  h, w = a.shape[0] // 2, a.shape[1] // 2
  pooled = a[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).max(axis=(1, 3))
  hidden = jax.nn.relu(pooled.reshape(-1) @ params['dense']['kernel'] + params['dense']['bias'])
  return (hidden @ params['logits']['kernel'] + params['logits']['bias'])[c]


def test_grad_cam_matches_an_independent_head():
  model = _tiny_model(filters=(4, 6))
  image = _image(16, 3)
  found_nonzero = False
  for seed in range(2):
    variables = _variables(model, 16, seed)
    ref = NumpyCNN(variables, 2, 'VALID', False)
    logits = ref.forward(np.asarray(image))
    acts = jnp.asarray(ref.block_output(2), jnp.float32)
    for c in range(3):
      grads = jax.grad(_class_score, argnums=1)(variables['params'], acts, c)
      want = np.maximum(np.einsum('hwk,k->hw', acts, grads.mean(axis=(0, 1))), 0)
      res = gb.guided_grad_cam(model, variables, image, class_index=c)
      np.testing.assert_allclose(res.cam_layer, want, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(res.probabilities, jax.nn.softmax(logits), rtol=1e-4)
      np.testing.assert_allclose(res.class_map, ref.backward_from_logit(c, 'guided'),
                                 rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(res.guided_grad_cam, res.class_map * res.cam[..., None],
                                 rtol=1e-6)
      assert res.cam.shape == image.shape[:2] and res.cam.min() >= 0 and res.cam.max() <= 1
      found_nonzero |= bool(want.max() > 0)
    assert gb.guided_grad_cam(model, variables, image).class_index == int(np.argmax(logits))
  assert found_nonzero  # the comparison above was not all zeros


def test_upsample_places_cells_at_receptive_field_centres():
  rf = gb.receptive_field(2, 3, 'VALID')  # size 8, jump 2: centres 3.5, 5.5, ...
  h, w = 4, 5
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  cam = 2.0 * ii - 1.0 * jj + 3.0
  up = gb.upsample_to_image(cam, rf, (16, 16))
  u = np.clip((np.arange(16) - 3.5) / 2, 0, h - 1)
  v = np.clip((np.arange(16) - 3.5) / 2, 0, w - 1)
  # Linear interpolation reproduces an affine map exactly, clamped outside the centres.
  np.testing.assert_allclose(up, 2.0 * u[:, None] - v[None, :] + 3.0, atol=1e-12)


# --- Figures. ------------------------------------------------------------------------------------

def test_normalize_map_keeps_zero_grey_and_signs():
  g = np.zeros((4, 4, 3), np.float32)
  np.testing.assert_array_equal(figures.normalize_map(g), 0.5)
  g[0, 0, 0], g[1, 1, 1] = 2.0, -1.0
  shown = figures.normalize_map(g)
  assert shown.min() >= 0 and shown.max() <= 1
  assert shown[0, 0, 0] > 0.5 > shown[1, 1, 1]
  assert shown[2, 2, 2] == 0.5


def test_figures_are_written(tmp_path):
  model = _tiny_model(filters=(4, 6))
  variables = _variables(model, 20, 0)
  image = _image(20, 0)
  acts = np.asarray(gb.layer_activations(model, variables, image, 'conv2'))
  neurons = gb.choose_neurons(acts, 3)
  boxes = gb.neuron_boxes(model, 'conv2', neurons, (20, 20))
  maps = {r: gb.neuron_gradients(model, variables, image, 'conv2', neurons, r) for r in RULES}
  result = gb.Explanation(np.asarray(image * 255, np.uint8), 'conv2', neurons, boxes, maps,
                          gb.guided_grad_cam(model, variables, image))
  paths = [figures.neuron_figure(result, 'guided', str(tmp_path / 'a' / 'guided.png'), 'title'),
           figures.comparison_figure(result, str(tmp_path / 'comparison.png')),
           figures.grad_cam_figure(result, 'x', str(tmp_path / 'gradcam.png'))]
  shapes = []
  for path in paths:
    png = mpimg.imread(path)
    assert png.ndim == 3 and png[..., :3].std() > 0.05  # drawn, not blank
    shapes.append(png.shape)
  assert shapes[0][0] > shapes[0][1]  # the neuron figure is a tall column: 1 + 3 rows
  assert shapes[2][1] > 2 * shapes[2][0]  # the Grad-CAM figure is one wide row


# --- The mode, on a trained tiny model. ----------------------------------------------------------

def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _check_first_run(out, data_dir):
  """The default run's figures and maps: guided, at conv2, for the 10 most active channels."""
  from cnn import input_pipeline

  for name in ('guided_backprop.png', 'comparison.png', 'guided_gradcam.png'):
    png = mpimg.imread(os.path.join(out, name))
    assert png[..., :3].std() > 0.05, name
  res = _load(os.path.join(out, 'guided_backprop.npz'))
  assert str(res['method']) == 'guided' and str(res['layer']) == 'conv2'
  maps = res['maps']
  assert maps.shape == (10, 32, 32, 3) and maps.dtype == np.float32
  assert np.all(np.isfinite(maps))
  assert np.all(np.abs(maps).reshape(10, -1).max(axis=1) > 0)
  np.testing.assert_array_equal(maps, res['maps_guided'])
  assert res['maps_vanilla'].shape == res['maps_deconvnet'].shape == maps.shape

  # The image is the seeded test image, read as training reads it.
  path = str(res['image_path'])
  assert os.path.dirname(os.path.dirname(path)) == os.path.join(data_dir, 'val')
  np.testing.assert_array_equal(res['image'], input_pipeline.read_image(path, 32))
  return res


def _check_against_the_checkpoint(res, config, workdir):
  """The first run's neurons, receptive fields and Grad-CAM, recomputed from its checkpoint."""
  from cnn import checkpoints

  # The neurons are the 10 most active channels at their peaks, recomputed here from the
  # restored checkpoint and the model's own block output.
  variables, _ = checkpoints.restore_best(workdir)
  model = models.create_model(config, 3)
  x = jnp.asarray(res['image'], jnp.float32)[None] / 255
  acts = np.asarray(models.block_output(model, variables, x, 'conv2'))[0]
  peak = acts.max(axis=(0, 1))
  assert set(res['channels']) == set(np.argsort(-peak)[:10])
  assert np.min(res['activations']) >= np.sort(peak)[-10] and np.min(res['activations']) > 0
  for ch, r, c, v in zip(res['channels'], res['rows'], res['cols'], res['activations']):
    assert acts[r, c, ch] == pytest.approx(v) and v == pytest.approx(peak[ch])

  # Every map lives inside its neuron's receptive field, and the field is the closed form's.
  rf = gb.receptive_field(2, 3, 'VALID')
  for m, (top, left, bottom, right), r, c in zip(res['maps'], res['receptive_fields'],
                                                  res['rows'], res['cols']):
    assert (top, bottom) == rf.span(int(r), 32) and (left, right) == rf.span(int(c), 32)
    outside = np.abs(m).sum(-1)
    outside[top:bottom, left:right] = 0
    assert np.all(outside == 0)

  logits = model.apply(variables, x, train=False)[0]
  assert int(res['predicted_class']) == int(np.argmax(logits))
  assert res['grad_cam'].shape == (32, 32)
  np.testing.assert_allclose(res['guided_grad_cam'], res['guided_class_map'] *
                             res['grad_cam'][..., None], rtol=1e-6)


def _check_config_overrides(config, workdir, out, data_dir):
  """Channels from the config, another rule, another image (changes `config` to say so)."""
  from cnn import input_pipeline

  config.guided_bp_channels = (3, 0)
  config.guided_bp_method = 'deconvnet'
  config.guided_bp_image = sorted(
      str(p) for p in pathlib.Path(data_dir).glob('train/*/*'))[0]
  assert gb.run_guided_bp(config, workdir, []) == 0
  res2 = _load(os.path.join(out, 'guided_backprop.npz'))
  np.testing.assert_array_equal(res2['channels'], [3, 0])
  assert str(res2['method']) == 'deconvnet' and str(res2['image_path']) == config.guided_bp_image
  np.testing.assert_array_equal(res2['maps'], res2['maps_deconvnet'])
  np.testing.assert_array_equal(res2['image'], input_pipeline.read_image(config.guided_bp_image,
                                                                        32))


def _check_command_line(workdir, out, res):
  """main.py reuses the workdir's config.json plus the overrides; `res` is the first run's."""
  proc = subprocess.run(
      [sys.executable, 'main.py', '--mode=guided_bp', f'--workdir={workdir}',
       '--config.guided_bp_num_neurons=4', '--config.guided_bp_method=vanilla'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res3 = _load(os.path.join(out, 'guided_backprop.npz'))
  assert res3['maps'].shape == (4, 32, 32, 3) and str(res3['method']) == 'vanilla'
  np.testing.assert_array_equal(res3['channels'], res['channels'][:4])
  np.testing.assert_allclose(res3['maps_guided'], res['maps'][:4], rtol=1e-5, atol=1e-7)
  assert 'wrote' in proc.stdout


def _check_bad_settings(config, workdir):
  """Settings that cannot work fail with a message saying what to change."""
  from cnn import config as config_lib
  from cnn import errors

  config.guided_bp_layer = 'conv5'
  with pytest.raises(config_lib.ConfigError, match='conv1..conv2'):
    gb.run_guided_bp(config, workdir, [])
  config.guided_bp_layer = 'conv2'
  config.guided_bp_method = 'guided'
  config.activation = 'gelu'  # as if the run had been trained with gelu
  with pytest.raises(config_lib.ConfigError, match='ReLU networks only'):
    gb.run_guided_bp(config, workdir, [])
  with pytest.raises(errors.UserError, match='positional'):
    gb.run_guided_bp(config, workdir, ['extra'])


def test_run_guided_bp_on_a_trained_model(trained_workdir, tmp_path):
  from cnn import checkpoints
  from tests import conftest

  # The shared run (batch norm, which must run in inference mode; conv2 with 12 channels, more
  # than the 10 neurons to choose from; guided_bp_layer conv2), copied: the mode writes into it.
  workdir = conftest.copy_workdir(trained_workdir, tmp_path / 'run')
  config = checkpoints.load_run_config(workdir)  # what main.py hands the mode
  assert config.batch_norm and config.guided_bp_layer == 'conv2'
  assert models.create_model(config, 3).filters[1] > 10
  data_dir = config.data_dir
  assert gb.run_guided_bp(config, workdir, []) == 0

  out = os.path.join(workdir, 'guided_bp')
  res = _check_first_run(out, data_dir)
  _check_against_the_checkpoint(res, config, workdir)
  _check_config_overrides(config, workdir, out, data_dir)
  _check_command_line(workdir, out, res)
  _check_bad_settings(config, workdir)
