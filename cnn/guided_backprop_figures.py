"""Figures of guided backprop: per-neuron maps, the three rules side by side, guided Grad-CAM."""

from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.patches as mpatches  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from cnn import figures

# Trimmed to the drawing, on the figure's own background.
_SAVEFIG = {'dpi': 100, 'facecolor': 'auto', 'bbox_inches': 'tight'}
_METHOD_TITLES = {'guided': 'guided backprop', 'vanilla': 'vanilla gradient',
                  'deconvnet': 'deconvnet'}


def normalize_map(g: np.ndarray) -> np.ndarray:
  """A gradient map to [0, 1] RGB with zero at mid-grey, signs kept, per-map scale.

  The scale is the 99.5th percentile of |g| rather than the max, so that one hot pixel does not
  flatten the rest of the map to grey.
  """
  g = np.asarray(g, np.float32)
  scale = np.percentile(np.abs(g), 99.5)
  if not np.isfinite(scale) or scale <= 0:
    scale = np.abs(g).max()
  if scale <= 0:
    return np.full(g.shape, 0.5, np.float32)
  return np.clip(0.5 + 0.5 * g / scale, 0.0, 1.0)


def _crop(a: np.ndarray, box: Sequence[int]) -> np.ndarray:
  top, left, bottom, right = (int(v) for v in box)
  return a[top:bottom, left:right]


def _box_patch(box: Sequence[int], color: str = 'yellow') -> mpatches.Rectangle:
  top, left, bottom, right = (int(v) for v in box)
  # Pixel k covers [k - 0.5, k + 0.5] in imshow coordinates.
  return mpatches.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                            edgecolor=color, linewidth=1.2)


def _image_to_float(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  return image / 255.0 if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0)


def _off(ax):
  ax.set_xticks([])
  ax.set_yticks([])


# PLR0913: public call fixed by tests/test_guided_backprop.py (layer=, method=, path=).
def neuron_figure(image: np.ndarray, maps: np.ndarray, neurons, boxes: np.ndarray, *,  # noqa: PLR0913
                  layer: str, method: str, path: str, title: str = '') -> str:
  """The input on top, then one row per neuron: its map, the map over its field, the input there.

  `neurons` is a `guided_backprop.Neurons`; `boxes` (K, 4) are receptive fields
  [top, left, bottom, right).
  """
  image = _image_to_float(image)
  k = len(maps)
  fig = plt.figure(figsize=(6.6, 2.1 * (k + 1.4)))
  grid = fig.add_gridspec(k + 1, 3, height_ratios=[1.4] + [1] * k, hspace=0.35, wspace=0.08)
  ax = fig.add_subplot(grid[0, :])
  ax.imshow(image)
  for box in boxes:
    ax.add_patch(_box_patch(box, color='yellow'))
  ax.set_title(title or f'input; yellow boxes = receptive fields of the {k} {layer} neurons',
               fontsize=9)
  _off(ax)
  name = _METHOD_TITLES.get(method, method)
  for row in range(k):
    shown = normalize_map(maps[row])
    axes = [fig.add_subplot(grid[row + 1, col]) for col in range(3)]
    axes[0].imshow(shown)
    axes[0].add_patch(_box_patch(boxes[row], color='red'))
    axes[1].imshow(_crop(shown, boxes[row]))
    axes[2].imshow(_crop(image, boxes[row]))
    axes[0].set_ylabel(
        f'{layer} ch {int(neurons.channels[row])}\n@ ({int(neurons.rows[row])}, '
        f'{int(neurons.cols[row])})\nact {float(neurons.values[row]):.3g}', fontsize=8)
    if row == 0:
      axes[0].set_title(name, fontsize=9)
      axes[1].set_title('zoom: receptive field', fontsize=9)
      axes[2].set_title('input: receptive field', fontsize=9)
    for a in axes:
      _off(a)
  return figures.save(fig, path, **_SAVEFIG)


# PLR0913: public call fixed by tests/test_guided_backprop.py (layer=, path=).
def comparison_figure(image: np.ndarray, maps: Mapping[str, np.ndarray], neurons,  # noqa: PLR0913
                      boxes: np.ndarray, *, layer: str, path: str) -> str:
  """One row per neuron: the input over its receptive field, then each rule's map there.

  Every map is scaled on its own (the rules differ in magnitude, not only in pattern).
  """
  image = _image_to_float(image)
  methods = list(maps)
  k = len(boxes)
  cols = 1 + len(methods)
  fig, axes = plt.subplots(k, cols, figsize=(1.9 * cols, 1.9 * k + 0.6), squeeze=False)
  for row in range(k):
    axes[row, 0].imshow(_crop(image, boxes[row]))
    axes[row, 0].set_ylabel(
        f'ch {int(neurons.channels[row])} @ ({int(neurons.rows[row])}, '
        f'{int(neurons.cols[row])})\nact {float(neurons.values[row]):.3g}', fontsize=8)
    for col, method in enumerate(methods, start=1):
      axes[row, col].imshow(_crop(normalize_map(maps[method][row]), boxes[row]))
    for a in axes[row]:
      _off(a)
  axes[0, 0].set_title('input', fontsize=9)
  for col, method in enumerate(methods, start=1):
    axes[0, col].set_title(_METHOD_TITLES.get(method, method), fontsize=9)
  fig.suptitle(f'{layer} neurons over their receptive fields: three backward rules', fontsize=10)
  fig.tight_layout()
  return figures.save(fig, path, **_SAVEFIG)


def grad_cam_figure(image: np.ndarray, result, *, class_name: str, path: str) -> str:
  """Input, Grad-CAM heat map, guided backprop of the class score, and their product."""
  image = _image_to_float(image)
  prob = float(result.probabilities[result.class_index])
  fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
  axes[0].imshow(image)
  axes[0].set_title(f'predicted: {class_name} ({prob:.0%})', fontsize=9)
  axes[1].imshow(image)
  axes[1].imshow(result.cam, cmap='jet', alpha=0.45, vmin=0.0, vmax=1.0)
  axes[1].set_title('Grad-CAM, last conv block', fontsize=9)
  axes[2].imshow(normalize_map(result.class_map))
  axes[2].set_title('guided backprop of the class score', fontsize=9)
  axes[3].imshow(normalize_map(result.guided_grad_cam))
  axes[3].set_title('guided Grad-CAM', fontsize=9)
  for a in axes:
    _off(a)
  fig.tight_layout()
  return figures.save(fig, path, **_SAVEFIG)
