"""Guided backpropagation, deconvnet and vanilla gradients of conv neurons; guided Grad-CAM.

The trained parameters are never copied: `model.clone(activation=...)` swaps every ReLU for
one whose backward pass follows the chosen rule (see `cnn.activations`):

  vanilla    g * (x > 0)                 the true gradient
  guided     g * (x > 0) * (g > 0)       Springenberg et al., 2015
  deconvnet  g * (g > 0)                 Zeiler & Fergus, 2014 (the reference's "guided" rule)
"""

import dataclasses
import functools
import logging
import os
import time
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn import checkpoints
from cnn import config as config_lib
from cnn import guided_backprop_figures as figures_lib
from cnn import input_pipeline
from cnn import metrics_writer
from cnn import models

METHODS = ('guided', 'vanilla', 'deconvnet')
_RULE_ACTIVATION = {'guided': 'guided_relu', 'deconvnet': 'deconvnet_relu'}
_RELU_FAMILY = ('relu', 'guided_relu', 'deconvnet_relu')


def backprop_model(model: models.CNN, method: str) -> models.CNN:
  """`model` with the activation whose backward pass is `method`'s rule; same parameters.

  The guided and deconvnet rules are defined for ReLU only; a model trained with another
  activation raises rather than silently giving a plain gradient. Vanilla is the true gradient
  of whatever activation the model was trained with.
  """
  if method not in METHODS:
    raise ValueError(f'unknown guided_bp_method {method!r}; choose one of {", ".join(METHODS)}')
  if model.activation not in _RELU_FAMILY:
    if method == 'vanilla':
      return model
    raise ValueError(
        f'the {method} backprop rule is defined for ReLU networks only, but this model was '
        f'trained with activation={model.activation!r}; use --config.guided_bp_method=vanilla '
        'for its plain input gradient, or train with activation=relu')
  return model.clone(activation=_RULE_ACTIVATION.get(method, 'relu'))


def layer_index(layer: str, num_layers: int) -> int:
  """1-based block number of a layer named 'convN', checked against the model's depth."""
  if not (layer.startswith('conv') and layer[4:].isdigit()):
    raise ValueError(f'guided_bp_layer must be conv1..conv{num_layers}, got {layer!r}')
  n = int(layer[4:])
  if not 1 <= n <= num_layers:
    raise ValueError(f'guided_bp_layer={layer!r} but the model has conv1..conv{num_layers}')
  return n


@functools.partial(jax.jit, static_argnames=('model', 'layer'))
def layer_activations(model: models.CNN, variables, image: jax.Array, layer: str) -> jax.Array:
  """Post-activation output (H', W', C) of block `layer` for one float image (H, W, 3)."""
  return models.block_output(model, variables, image[None], layer)[0]


class Neurons(NamedTuple):
  """K neurons of one layer: channel, spatial position and activation value of each."""
  channels: np.ndarray  # (K,) int
  rows: np.ndarray  # (K,) int
  cols: np.ndarray  # (K,) int
  values: np.ndarray  # (K,) float


def choose_neurons(acts: np.ndarray, num: int, channels: Sequence[int] = ()) -> Neurons:
  """Each channel at its strongest position; by default the `num` channels with largest max.

  `acts` is (H', W', C). Random channels, as the reference picked, are often silent on a given
  image and then have an all-zero guided map; the most active ones always explain something.
  """
  acts = np.asarray(acts)
  h, w, c = acts.shape
  flat = acts.reshape(h * w, c)
  peak = flat.max(axis=0)
  if len(channels):
    chosen = np.asarray([int(ch) for ch in channels])
    if np.any((chosen < 0) | (chosen >= c)):
      raise ValueError(f'guided_bp_channels {list(chosen)} out of range: the layer has {c}')
  else:
    # Stable sort so that ties (e.g. several dead channels) resolve to the lower index.
    chosen = np.argsort(-peak, kind='stable')[:min(num, c)]
  pos = flat[:, chosen].argmax(axis=0)
  return Neurons(channels=chosen.astype(np.int32), rows=(pos // w).astype(np.int32),
                 cols=(pos % w).astype(np.int32), values=peak[chosen].astype(np.float32))


@functools.partial(jax.jit, static_argnames=('model', 'layer'))
def _neuron_gradients(model, variables, image, layer, index):
  def neuron(img, idx):
    acts = models.block_output(model, variables, img[None], layer)
    return acts[0, idx[0], idx[1], idx[2]].astype(jnp.float32)

  # The image is shared, so the forward pass runs once and only the backward pass is batched.
  return jax.vmap(jax.grad(neuron), in_axes=(None, 0))(image, index)


# PLR0913: public call fixed by tests/test_guided_backprop.py (six positional arguments).
def neuron_gradients(model: models.CNN, variables, image, layer: str, neurons: Neurons,  # noqa: PLR0913
                     method: str = 'guided') -> np.ndarray:
  """d(neuron activation)/d(image) under `method`'s rule for every neuron: (K, H, W, 3)."""
  layer_index(layer, len(model.filters))
  index = jnp.stack([neurons.rows, neurons.cols, neurons.channels], axis=1).astype(jnp.int32)
  image = jnp.asarray(image, jnp.float32)
  return np.asarray(_neuron_gradients(backprop_model(model, method), variables, image, layer,
                                      index))


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """Output index t of a layer sees input pixels start + t * jump ... + size - 1 (per axis)."""
  size: int
  jump: int
  start: int

  def span(self, index: int, image_size: int) -> tuple[int, int]:
    """[lo, hi) of input pixels seen by output `index`, clipped to the image (padding dropped)."""
    lo = self.start + index * self.jump
    return max(lo, 0), min(lo + self.size, image_size)

  def center(self, index):
    return self.start + index * self.jump + (self.size - 1) / 2


def receptive_field(layer: int, kernel_size: int, padding: str) -> ReceptiveField:
  """Receptive field of block `layer`'s output (before its pool): stride-1 convs, 2x2/2 pools.

  A k-wide conv grows the field by (k - 1) * jump and shifts its start by -pad_low * jump;
  a pool grows it by one jump and doubles the jump. SAME pads (k - 1) // 2 before, like XLA.
  """
  pad_low = (kernel_size - 1) // 2 if padding.upper() == 'SAME' else 0
  size, jump, start = 1, 1, 0
  for block in range(1, layer + 1):
    start -= pad_low * jump
    size += (kernel_size - 1) * jump
    if block < layer:
      size += jump
      jump *= 2
  return ReceptiveField(size=size, jump=jump, start=start)


def neuron_boxes(model: models.CNN, layer: str, neurons: Neurons,
                 image_shape: tuple[int, int]) -> np.ndarray:
  """(K, 4) [top, left, bottom, right) of each neuron's receptive field, clipped to the image."""
  rf = receptive_field(layer_index(layer, len(model.filters)), model.kernel_size, model.padding)
  boxes = []
  for r, c in zip(neurons.rows, neurons.cols):
    top, bottom = rf.span(int(r), image_shape[0])
    left, right = rf.span(int(c), image_shape[1])
    boxes.append((top, left, bottom, right))
  return np.asarray(boxes, np.int32).reshape(-1, 4)


@functools.partial(jax.jit, static_argnames='model')
def _grad_cam(model, variables, image, class_index):
  layer = f'conv{len(model.filters)}'

  def class_logit(eps):
    # Grad-CAM needs d logit / d(last block output); the model exposes that output only as a
    # sown value, so the gradient is taken at the dense layer's input (the pooled, flattened
    # block output) and carried back through the model's own pool below.
    def add_eps(next_fun, args, kwargs, context):
      if context.module.name == 'dense' and context.method_name == '__call__':
        if args[0].shape != eps.shape:
          raise ValueError('Grad-CAM expects the dense layer to read the flattened pooled '
                           f'{layer} output, got {args[0].shape} vs {eps.shape}')
        args = (args[0] + eps,) + tuple(args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(add_eps):
      logits = model.apply(variables, image[None], train=False)
    return logits[0, class_index], logits[0]

  acts = layer_activations(model, variables, image, layer)
  pooled = models.max_pool_2x2(acts[None])
  eps = jnp.zeros((1, pooled.size), acts.dtype)
  grad_pooled, logits = jax.grad(class_logit, has_aux=True)(eps)
  _, pool_vjp = jax.vjp(models.max_pool_2x2, acts[None].astype(jnp.float32))
  grad_acts = pool_vjp(grad_pooled.reshape(pooled.shape))[0][0]
  weights = grad_acts.mean(axis=(0, 1))  # alpha_k of Selvaraju et al., 2017
  cam = jax.nn.relu(jnp.einsum('hwc,c->hw', acts.astype(jnp.float32), weights))
  return cam, logits


def upsample_to_image(cam: np.ndarray, rf: ReceptiveField, image_shape: tuple[int, int]):
  """Linear interpolation of a layer map to pixels, each cell placed at its receptive-field centre.

  A plain resize would stretch the map over the whole image, but with VALID padding the cells'
  centres cover only the image's middle: cell t sits at pixel rf.center(t).
  """
  h, w = cam.shape
  rows = np.stack([np.interp(np.arange(image_shape[0]), rf.center(np.arange(h)), cam[:, j])
                   for j in range(w)], axis=1)
  return np.stack([np.interp(np.arange(image_shape[1]), rf.center(np.arange(w)), rows[i])
                   for i in range(image_shape[0])], axis=0)


@functools.partial(jax.jit, static_argnames='model')
def _class_gradient(model, variables, image, class_index):
  return jax.grad(lambda img: model.apply(variables, img[None], train=False)[0, class_index])(image)


class GuidedGradCam(NamedTuple):
  class_index: int
  probabilities: np.ndarray  # (num_classes,)
  cam_layer: np.ndarray  # (H', W') Grad-CAM on the last conv block
  cam: np.ndarray  # (H, W) upsampled, scaled to [0, 1]
  class_map: np.ndarray  # (H, W, 3) guided backprop of the class logit
  guided_grad_cam: np.ndarray  # (H, W, 3) = class_map * cam


def guided_grad_cam(model: models.CNN, variables, image, class_index: int | None = None
                    ) -> GuidedGradCam:
  """Guided Grad-CAM (Selvaraju et al., 2017) for `class_index`, by default the predicted class."""
  image = jnp.asarray(image, jnp.float32)
  plain = backprop_model(model, 'vanilla')
  if class_index is None:
    logits = plain.apply(variables, image[None], train=False)[0]
    class_index = int(jnp.argmax(logits))
  cam_layer, logits = _grad_cam(plain, variables, image, class_index)
  cam_layer = np.asarray(cam_layer)
  rf = receptive_field(len(model.filters), model.kernel_size, model.padding)
  cam = upsample_to_image(cam_layer, rf, image.shape[:2])
  cam = cam / cam.max() if cam.max() > 0 else cam
  class_map = np.asarray(_class_gradient(backprop_model(model, 'guided'), variables, image,
                                         class_index))
  return GuidedGradCam(
      class_index=class_index, probabilities=np.asarray(jax.nn.softmax(logits)),
      cam_layer=cam_layer, cam=cam.astype(np.float32), class_map=class_map,
      guided_grad_cam=(class_map * cam[..., None]).astype(np.float32))


def _check_config(config, model: models.CNN) -> None:
  """ConfigError (so main prints one line) for guided_bp_* values that cannot work."""
  if config.guided_bp_method not in METHODS:
    raise config_lib.ConfigError(f'guided_bp_method={config.guided_bp_method!r}; use one of '
                                 f'{", ".join(METHODS)}')
  try:
    layer_index(config.guided_bp_layer, len(model.filters))
    backprop_model(model, config.guided_bp_method)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  if config.guided_bp_num_neurons < 1:
    raise config_lib.ConfigError(
        f'guided_bp_num_neurons={config.guided_bp_num_neurons} must be at least 1')


def pick_image(config) -> tuple[np.ndarray, str]:
  """(S, S, 3) uint8 image and its path: config.guided_bp_image, else a seeded test image."""
  if config.guided_bp_image:
    if not os.path.isfile(config.guided_bp_image):
      raise config_lib.ConfigError(f'guided_bp_image {config.guided_bp_image!r} does not exist')
    return input_pipeline.read_image(config.guided_bp_image, config.image_size), \
        config.guided_bp_image
  paths = input_pipeline.discover(config.data_dir)[0]['val'].paths
  rng = np.random.default_rng(config.eval_image_seed)
  # An unreadable file is skipped, as training skips it, by moving on in a seeded order.
  for i in rng.permutation(len(paths)):
    try:
      return input_pipeline.read_image(paths[i], config.image_size), paths[i]
    except input_pipeline.ImageReadError as e:
      logging.warning('%s', e)
  raise input_pipeline.DatasetError(f'no readable test image under {config.data_dir}/val')


class Explanation(NamedTuple):
  neurons: Neurons
  boxes: np.ndarray  # (K, 4)
  maps: dict[str, np.ndarray]  # method -> (K, H, W, 3)
  grad_cam: GuidedGradCam | None  # None for non-ReLU models


def explain(model: models.CNN, variables, image: np.ndarray, config) -> Explanation:
  """Neurons of config.guided_bp_layer on one uint8 image, their maps under every usable rule."""
  x = jnp.asarray(image, jnp.float32) / 255.0
  layer = config.guided_bp_layer
  acts = np.asarray(layer_activations(model, variables, x, layer))
  neurons = choose_neurons(acts, config.guided_bp_num_neurons, config.guided_bp_channels)
  methods = METHODS if model.activation in _RELU_FAMILY else ('vanilla',)
  maps = {m: neuron_gradients(model, variables, x, layer, neurons, m) for m in methods}
  gcam = guided_grad_cam(model, variables, x) if 'guided' in methods else None
  return Explanation(neurons=neurons, boxes=neuron_boxes(model, layer, neurons, image.shape[:2]),
                     maps=maps, grad_cam=gcam)


def run_guided_bp(config, workdir: str, argv_rest: list[str]) -> int:
  """--mode=guided_bp: explain conv neurons of the best checkpoint on one test image.

  Writes WORKDIR/guided_bp/{guided_backprop.png, comparison.png, guided_gradcam.png,
  guided_backprop.npz}.
  """
  if argv_rest:
    raise config_lib.ConfigError(f'--mode=guided_bp takes no positional arguments, got '
                                 f'{argv_rest}')
  t0 = time.time()
  model, variables, class_names, meta = checkpoints.load_best_model(config, workdir)
  # Gradients in float32 whatever the training dtype: bfloat16 maps lose most small values.
  model = model.clone(dtype=jnp.float32)
  _check_config(config, model)
  image, image_path = pick_image(config)
  result = explain(model, variables, image, config)
  method, layer = config.guided_bp_method, config.guided_bp_layer
  neurons = result.neurons
  if len(neurons.channels) < config.guided_bp_num_neurons:
    print(f'{layer} has only {len(neurons.channels)} channels; explaining all of them')
  silent = [int(c) for c, v in zip(neurons.channels, neurons.values) if v <= 0]
  if silent:
    print(f'channels {silent} are silent on this image (activation 0): their guided and vanilla '
          'maps are zero')

  out_dir = os.path.join(workdir, 'guided_bp')
  os.makedirs(out_dir, exist_ok=True)
  epoch = meta.get('epoch', '?') if isinstance(meta, dict) else '?'
  title = (f'{os.path.basename(image_path)}; yellow boxes = receptive fields of the '
           f'{len(neurons.channels)} {layer} neurons (best checkpoint, epoch {epoch})')
  subject = _Subject(image, image_path, title)
  figures = _draw_figures(result, subject, class_names, config, out_dir)
  if result.grad_cam is None:
    print(f'guided Grad-CAM skipped: it needs guided backprop, which is defined for ReLU only '
          f'(activation={model.activation!r})')
  _save_arrays(result, subject, config, out_dir)
  writer = metrics_writer.beside_training(config, workdir)
  try:
    writer.log_images(figures)
  finally:
    writer.close()
  _print_neurons(result, class_names, layer)
  print(f'{method} backprop of {image_path}: wrote {out_dir}/ in {time.time() - t0:.1f} s')
  return 0


class _Subject(NamedTuple):
  """The explained test image, its file and the title its figures carry."""
  image: np.ndarray
  path: str
  title: str


def _draw_figures(result: Explanation, subject: _Subject, class_names: list[str], config,
                  out_dir: str) -> dict[str, str]:
  """The PNGs of one explanation; returns {W&B key: path}."""
  image, method, layer = subject.image, config.guided_bp_method, config.guided_bp_layer
  neurons = result.neurons
  figures = {'guided_bp/guided_backprop': figures_lib.neuron_figure(
      image, result.maps[method], neurons, result.boxes, layer=layer, method=method,
      path=os.path.join(out_dir, 'guided_backprop.png'), title=subject.title)}
  if len(result.maps) > 1:
    side_by_side = {m: result.maps[m] for m in ('vanilla', 'deconvnet', 'guided')}
    figures['guided_bp/comparison'] = figures_lib.comparison_figure(
        image, side_by_side, neurons, result.boxes, layer=layer,
        path=os.path.join(out_dir, 'comparison.png'))
  gcam = result.grad_cam
  if gcam is not None:
    figures['guided_bp/guided_gradcam'] = figures_lib.grad_cam_figure(
        image, gcam, class_name=class_names[gcam.class_index],
        path=os.path.join(out_dir, 'guided_gradcam.png'))
  return figures


def _save_arrays(result: Explanation, subject: _Subject, config, out_dir: str) -> None:
  """guided_backprop.npz: every map, the neurons and, for ReLU models, the Grad-CAM arrays."""
  method, neurons = config.guided_bp_method, result.neurons
  arrays = dict(
      maps=result.maps[method], method=method, layer=config.guided_bp_layer,
      image=subject.image, image_path=subject.path,
      channels=neurons.channels, rows=neurons.rows, cols=neurons.cols,
      activations=neurons.values, receptive_fields=result.boxes,
      **{f'maps_{m}': v for m, v in result.maps.items()})
  gcam = result.grad_cam
  if gcam is not None:
    arrays.update(predicted_class=gcam.class_index, probabilities=gcam.probabilities,
                  grad_cam=gcam.cam, guided_grad_cam=gcam.guided_grad_cam,
                  guided_class_map=gcam.class_map)
  np.savez_compressed(os.path.join(out_dir, 'guided_backprop.npz'), **arrays)


def _print_neurons(result: Explanation, class_names: list[str], layer: str) -> None:
  neurons, gcam = result.neurons, result.grad_cam
  for c, r, col, v in zip(neurons.channels, neurons.rows, neurons.cols, neurons.values):
    print(f'{layer} channel {int(c):4d} at ({int(r)}, {int(col)}): activation {float(v):.4g}')
  if gcam is not None:
    print(f'predicted {class_names[gcam.class_index]} '
          f'({float(gcam.probabilities[gcam.class_index]):.1%})')
