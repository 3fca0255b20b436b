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
from cnn import errors
from cnn import figures
from cnn import input_pipeline
from cnn import metrics_writer
from cnn import models

METHODS = ('guided', 'vanilla', 'deconvnet')
_RELU_FAMILY = ('relu', 'guided_relu', 'deconvnet_relu')


def backprop_model(model: models.CNN, method: str) -> models.CNN:
  """`model` with the activation whose backward pass is `method`'s rule; same parameters.

  The guided and deconvnet rules are defined for ReLU only; a model trained with another
  activation raises rather than silently giving a plain gradient. Vanilla is the true gradient
  of whatever activation the model was trained with.
  """
  if method not in METHODS:
    raise config_lib.ConfigError(f'unknown guided_bp_method {method!r}; choose one of '
                                 f'{", ".join(METHODS)}')
  if model.activation not in _RELU_FAMILY:
    if method == 'vanilla':
      return model
    raise config_lib.ConfigError(
        f'the {method} backprop rule is defined for ReLU networks only, but this model was '
        f'trained with activation={model.activation!r}; use --config.guided_bp_method=vanilla '
        'for its plain input gradient, or train with activation=relu')
  return model.clone(activation='relu' if method == 'vanilla' else f'{method}_relu')


def layer_index(layer: str, num_layers: int) -> int:
  """1-based block number of a layer named 'convN', checked against the model's depth."""
  if not (layer.startswith('conv') and layer[4:].isdigit()):
    raise config_lib.ConfigError(f'guided_bp_layer must be conv1..conv{num_layers}, got '
                                 f'{layer!r}')
  n = int(layer[4:])
  if not 1 <= n <= num_layers:
    raise config_lib.ConfigError(f'guided_bp_layer={layer!r} but the model has '
                                 f'conv1..conv{num_layers}')
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
      raise config_lib.ConfigError(f'guided_bp_channels {list(chosen)} out of range: the layer '
                                   f'has {c}')
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


# PLR0913: the model, its weights, the image, and which neurons of which layer under which rule.
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

  def class_logit(acts):
    # Grad-CAM needs d logit / d(last block output); the model exposes that output only as a
    # sown value, so the dense layer's input (the pooled, flattened block output) is replaced by
    # the same value computed from `acts` through the model's own pool.
    def from_acts(next_fun, args, kwargs, context):
      if context.module.name == 'dense' and context.method_name == '__call__':
        args = (models.max_pool_2x2(acts[None]).reshape(1, -1),) + tuple(args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(from_acts):
      logits = model.apply(variables, image[None], train=False)
    return logits[0, class_index], logits[0]

  acts = layer_activations(model, variables, image, layer).astype(jnp.float32)
  grad_acts, logits = jax.grad(class_logit, has_aux=True)(acts)
  weights = grad_acts.mean(axis=(0, 1))  # alpha_k of Selvaraju et al., 2017
  cam = jax.nn.relu(jnp.einsum('hwc,c->hw', acts, weights))
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
  image: np.ndarray  # (H, W, 3) uint8
  layer: str
  neurons: Neurons
  boxes: np.ndarray  # (K, 4) receptive fields [top, left, bottom, right)
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
  return Explanation(image, layer, neurons, neuron_boxes(model, layer, neurons, image.shape[:2]),
                     maps, gcam)


def run_guided_bp(config, workdir: str, argv_rest: list[str]) -> int:
  """--mode=guided_bp: explains conv neurons of the best checkpoint on one test image.

  Writes WORKDIR/guided_bp/{guided_backprop.png, comparison.png, guided_gradcam.png,
  guided_backprop.npz}.
  """
  if argv_rest:
    raise errors.UserError(f'--mode=guided_bp takes no positional arguments, got {argv_rest}')
  t0 = time.time()
  model, variables, class_names, meta = checkpoints.load_best_model(config, workdir)
  # Gradients in float32 whatever the training dtype: bfloat16 maps lose most small values.
  model = model.clone(dtype=jnp.float32)
  layer_index(config.guided_bp_layer, len(model.filters))
  backprop_model(model, config.guided_bp_method)
  if config.guided_bp_num_neurons < 1:
    raise config_lib.ConfigError(
        f'guided_bp_num_neurons={config.guided_bp_num_neurons} must be at least 1')
  image, image_path = pick_image(config)
  result = explain(model, variables, image, config)
  _print_neurons(result, class_names, config.guided_bp_num_neurons)

  out_dir = os.path.join(workdir, 'guided_bp')
  method, out = config.guided_bp_method, functools.partial(os.path.join, out_dir)
  title = (f'{os.path.basename(image_path)}; yellow boxes = receptive fields of the '
           f'{len(result.boxes)} {result.layer} neurons (best checkpoint, epoch '
           f'{meta.get("epoch", "?")})')
  pngs = {'guided_bp/guided_backprop': figures.neuron_figure(
      result, method, out('guided_backprop.png'), title)}
  if len(result.maps) > 1:
    pngs['guided_bp/comparison'] = figures.comparison_figure(result, out('comparison.png'))
  if result.grad_cam is not None:
    pngs['guided_bp/guided_gradcam'] = figures.grad_cam_figure(
        result, class_names[result.grad_cam.class_index], out('guided_gradcam.png'))
  _save_arrays(result, method, image_path, out('guided_backprop.npz'))
  writer = metrics_writer.beside_training(config, workdir)
  try:
    writer.log_images(pngs)
  finally:
    writer.close()
  print(f'{method} backprop of {image_path}: wrote {out_dir}/ in {time.time() - t0:.1f} s')
  return 0


def _save_arrays(result: Explanation, method: str, image_path: str, path: str) -> None:
  """Every map, the neurons and, for ReLU models, the Grad-CAM arrays."""
  neurons, gcam = result.neurons, result.grad_cam
  arrays = dict(
      maps=result.maps[method], method=method, layer=result.layer, image=result.image,
      image_path=image_path, channels=neurons.channels, rows=neurons.rows, cols=neurons.cols,
      activations=neurons.values, receptive_fields=result.boxes,
      **{f'maps_{m}': v for m, v in result.maps.items()})
  if gcam is not None:
    arrays.update(predicted_class=gcam.class_index, probabilities=gcam.probabilities,
                  grad_cam=gcam.cam, guided_grad_cam=gcam.guided_grad_cam,
                  guided_class_map=gcam.class_map)
  np.savez_compressed(path, **arrays)


def _print_neurons(result: Explanation, class_names: list[str], num_asked: int) -> None:
  neurons, gcam = result.neurons, result.grad_cam
  if len(neurons.channels) < num_asked:
    print(f'{result.layer} has only {len(neurons.channels)} channels; explaining all of them')
  for c, r, col, v in zip(neurons.channels, neurons.rows, neurons.cols, neurons.values):
    print(f'{result.layer} channel {int(c):4d} at ({int(r)}, {int(col)}): activation '
          f'{float(v):.4g}' + ('  (silent on this image: its guided and vanilla maps are zero)'
                               if v <= 0 else ''))
  if gcam is None:
    print('guided Grad-CAM skipped: it needs guided backprop, which is defined for ReLU only')
  else:
    print(f'predicted {class_names[gcam.class_index]} '
          f'({float(gcam.probabilities[gcam.class_index]):.1%})')
