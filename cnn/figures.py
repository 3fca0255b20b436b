"""The PNGs of evaluate and guided_bp: pure functions of numpy arrays, class names and a path.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot), so nothing
depends on a display or on pyplot's global state.
"""

import math
import os
import textwrap
from typing import Any, NamedTuple, Sequence

from matplotlib import figure as mpl_figure
from matplotlib import patches as mpatches
import numpy as np

from cnn import atomic

CORRECT, WRONG = '#1a9641', '#d7191c'  # green / red, told apart also by ✓ / ✗
TRUE_CLASS = '#2b83ba'
GRID_IMAGES = 30  # the reference's 10 x 3 grid
DPI = 100


def near_square_grid(n: int) -> tuple[int, int]:
  """(rows, cols) for n panels: an exact factorisation no wider than 2:1 (64 -> 8x8, 32 -> 4x8),
  else the smallest square-ish grid that holds n (7 -> 3x3)."""
  if n < 1:
    raise ValueError(f'need at least one panel, got {n}')
  for rows in range(math.isqrt(n), 0, -1):
    if n % rows == 0 and n // rows <= 2 * rows:
      return rows, n // rows
  cols = math.ceil(math.sqrt(n))
  return math.ceil(n / cols), cols


def predictions_grid_columns(num_classes: int) -> int:
  """Images per class row: 3 for 10 classes as in the reference; fewer classes get more
  columns (up to 6) so the grid still shows about 30 images."""
  return min(6, max(3, math.ceil(GRID_IMAGES / num_classes)))


def predictions_grid_indices(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """(num_classes, columns) indices into the test set, row c drawn from class c without
  replacement (seeded); -1 where a class has fewer images than columns."""
  rng = np.random.default_rng(seed)
  grid = np.full((num_classes, predictions_grid_columns(num_classes)), -1, np.int64)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    pick = np.sort(rng.choice(idx, size=min(grid.shape[1], len(idx)), replace=False))
    grid[c, :len(pick)] = pick
  return grid


def _as_float_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  return image / 255.0 if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0)


def _title(fig: mpl_figure.Figure, text: str, width_in: float) -> None:
  """A bold 14 pt figure title wrapped to the figure's width."""
  fig.suptitle(textwrap.fill(text, max(20, int(width_in * 110 / 14))), fontsize=14,
               fontweight='bold')


def save(fig: mpl_figure.Figure, path: str | os.PathLike, **savefig_kwargs: Any) -> str:
  """Writes `fig` to `path` atomically (a reader never sees half a PNG); returns the path.

  `savefig_kwargs` go to `Figure.savefig` (default dpi=DPI, white background).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  kwargs = {'dpi': DPI, 'facecolor': 'white', 'format': os.path.splitext(path)[1][1:] or 'png',
            **savefig_kwargs}
  atomic.atomic_write(path, lambda f: fig.savefig(f, **kwargs), binary=True)
  return path


def display_name(name: str, width: int = 0) -> str:
  """'white_headed_capuchin' -> 'white headed capuchin', wrapped to `width` if given."""
  name = name.replace('_', ' ')
  return textwrap.fill(name, width, break_long_words=False) if width else name


class GridData(NamedTuple):
  """What the cells of a predictions grid are drawn from: images (N, S, S, 3), labels (N,),
  class probabilities (N, C) and the class names."""
  images: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  class_names: list[str]


def plot_predictions_grid(shown: GridData, grid: np.ndarray, path: str | os.PathLike,
                          title: str) -> str:
  """One row per true class; each cell: the image framed green (✓) or red (✗), the predicted
  class and its probability, and bars of the top-3 probabilities underneath.

  `grid` comes from `predictions_grid_indices`.
  """
  rows, cols = grid.shape
  cell_w, cell_h, left = 2.5, 3.55, 1.5  # inches
  width = cell_w * cols + left
  chars = int(width * 11)  # about how many 10.5 pt characters fit across the figure
  heading = textwrap.fill(title, chars * 2 // 3)
  ok_all = shown.probs.argmax(-1)[grid[grid >= 0]] == shown.labels[grid[grid >= 0]]
  legend = textwrap.fill(
      f'One row per true class; {ok_all.sum()} of {ok_all.size} shown are correct. ✓ green / ✗ '
      'red frame: predicted class and its probability; bars: the top-3 probabilities (blue: the '
      'true class when it is not the prediction).', chars)
  head = 0.35 + 0.3 * (heading.count('\n') + 1) + 0.2 * (legend.count('\n') + 1) + 0.5
  height = cell_h * rows + head
  fig = mpl_figure.Figure(figsize=(width, height))
  outer = fig.add_gridspec(rows, cols, left=left / width, top=1 - head / height,
                           bottom=0.005, right=0.985, hspace=0.3, wspace=0.1)
  for r in range(rows):
    for c in range(cols):
      cell = outer[r, c].subgridspec(2, 1, height_ratios=[3.5, 1.0], hspace=0.05)
      ax_img, ax_bar = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
      ax_img.set_xticks([]), ax_img.set_yticks([])
      ax_bar.set_axis_off()
      if c == 0:
        ax_img.set_ylabel(display_name(shown.class_names[r], 16), fontsize=13,
                          fontweight='bold', labelpad=8)
      if grid[r, c] >= 0:
        _draw_prediction_cell(ax_img, ax_bar, shown, grid[r, c])
      else:
        ax_img.set_frame_on(False)
        ax_img.text(0.5, 0.5, 'no more\ntest images', ha='center', va='center',
                    color='0.5', fontsize=10, transform=ax_img.transAxes)
  fig.text(0.5, 1 - 0.12 / height, heading, ha='center', va='top', fontsize=15,
           fontweight='bold')
  fig.text(0.5, 1 - (0.22 + 0.3 * (heading.count('\n') + 1)) / height, legend, ha='center',
           va='top', fontsize=10.5)
  return save(fig, path)


def _draw_prediction_cell(ax_img, ax_bar, shown: GridData, i: int) -> None:
  """Test image `i` framed by whether it is right, its prediction, and its top-3 bars."""
  images, labels, probs, class_names = shown
  pred = probs[i].argmax()
  ok = pred == labels[i]
  color = CORRECT if ok else WRONG
  ax_img.imshow(_as_float_image(images[i]))
  for spine in ax_img.spines.values():
    spine.set_edgecolor(color)
    spine.set_linewidth(4)
  label = f'{"✓" if ok else "✗"} {display_name(class_names[pred])}  {probs[i, pred]:.0%}'
  ax_img.set_title(textwrap.fill(label, 24, break_long_words=False),
                   color=color, fontsize=10.5, fontweight='bold', pad=4, linespacing=1.0)
  top = np.argsort(-probs[i])[:3]
  y = np.arange(len(top))
  bar_colors = [color if k == pred else (TRUE_CLASS if k == labels[i] else '0.75')
                for k in top]
  ax_bar.barh(y, probs[i, top], color=bar_colors, alpha=0.45, height=0.8)
  ax_bar.set_xlim(0, 1)
  ax_bar.set_ylim(len(top) - 0.5, -0.5)
  for yy, k in zip(y, top):
    ax_bar.text(0.015, yy, f'{probs[i, k]:4.0%}  {display_name(class_names[k])}',
                va='center', fontsize=8.5, color='black')


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str],
                          path: str | os.PathLike, title: str) -> str:
  """confusion[t, p] counts test images of true class t predicted as p; each row is shown as
  a share of its class with the count beneath; empty cells are left blank."""
  confusion = np.asarray(confusion)
  n = len(class_names)
  totals = confusion.sum(1, keepdims=True)
  share = np.divide(confusion, totals, out=np.zeros(confusion.shape, float), where=totals > 0)
  size = max(6.0, 0.75 * n + 3.0)
  fig = mpl_figure.Figure(figsize=(size + 1.2, size), layout='constrained')
  ax = fig.add_subplot()
  im = ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label('share of the true class',
                                                              fontsize=11)
  fontsize = 11 if n <= 10 else 8
  for t, p in zip(*np.nonzero(confusion)):  # blank cells keep the eye on the real confusions
    ax.text(p, t, f'{share[t, p]:.0%}\n({confusion[t, p]})', ha='center', va='center',
            fontsize=fontsize, color='white' if share[t, p] > 0.55 else 'black')
  ax.set_xticks(range(n), [display_name(c) for c in class_names], rotation=40, ha='right',
                rotation_mode='anchor', fontsize=fontsize + 1)
  row_labels = [f'{display_name(c)} ({int(k)})' for c, k in zip(class_names, totals[:, 0])]
  ax.set_yticks(range(n), row_labels, fontsize=fontsize + 1)
  ax.set_xlabel('predicted class', fontsize=13)
  ax.set_ylabel('true class (test images)', fontsize=13)
  _title(fig, title, size + 1.2)
  return save(fig, path)


def filters_for_display(kernel: np.ndarray) -> np.ndarray:
  """(k, k, 3, F) conv kernel -> (F, k, k, 3) in [0, 1], each filter min-max scaled over all
  its weights (so its colour balance is kept); a constant filter shows as mid grey."""
  f = np.moveaxis(np.asarray(kernel, np.float64), -1, 0)
  lo = f.min(axis=(1, 2, 3), keepdims=True)
  span = f.max(axis=(1, 2, 3), keepdims=True) - lo
  return np.where(span > 0, (f - lo) / np.where(span > 0, span, 1), 0.5)


def plot_first_layer_filters(kernel: np.ndarray, path: str | os.PathLike) -> str:
  """Every first-layer kernel (k, k, 3, F) as a small RGB image on a near-square grid."""
  tiles = filters_for_display(kernel)
  num, k = tiles.shape[0], tiles.shape[1]
  rows, cols = near_square_grid(num)
  text = (f'First-layer filters: {num} kernels of {k}×{k}×3 (RGB), each scaled to its own '
          'min–max')
  width = max(6.0, 1.15 * cols + 0.4)
  fig = mpl_figure.Figure(figsize=(width, 1.25 * rows + 1.0), layout='constrained')
  for j, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
    ax.set_axis_off()
    if j < num:
      ax.imshow(tiles[j], interpolation='nearest')
      ax.set_title(str(j), fontsize=9, pad=2)
  _title(fig, text, width)
  return save(fig, path)


def plot_first_layer_activations(image: np.ndarray, feature_maps: np.ndarray,
                                 path: str | os.PathLike, title: str, caption: str) -> str:
  """The input image beside the feature map (H, W, F) of every first-layer filter, each map
  on its own colour scale (bright = strong response); an all-zero map is marked 'dead'."""
  maps = np.asarray(feature_maps, np.float64)
  rows, cols = near_square_grid(maps.shape[-1])
  width, height = 5.2 + 1.3 * cols, max(5.6, 1.3 * rows + 1.4)
  fig = mpl_figure.Figure(figsize=(width, height))
  top = 1 - 1.1 / height
  ax = fig.add_axes((0.015, 0.12, 4.6 / width, top - 0.16))
  ax.imshow(_as_float_image(image))
  ax.set_axis_off()
  ax.set_title(caption, fontsize=12)
  grid = fig.add_gridspec(rows, cols, left=5.0 / width, right=0.99, bottom=0.02, top=top,
                          wspace=0.08, hspace=0.28)
  for j in range(maps.shape[-1]):
    ax = fig.add_subplot(grid[divmod(j, cols)])
    ax.set_axis_off()
    lo, hi = maps[..., j].min(), maps[..., j].max()
    ax.imshow(maps[..., j], cmap='viridis', vmin=lo, vmax=hi if hi > lo else lo + 1)
    dead = hi == lo == 0
    ax.set_title(f'{j}' + (' dead' if dead else ''), fontsize=8, pad=2,
                 color=WRONG if dead else 'black')
  _title(fig, title, width)
  return save(fig, path)


# Guided backprop: trimmed to the drawing, on the figure's own background.
_TRIMMED = {'facecolor': 'auto', 'bbox_inches': 'tight'}
_RULE_TITLES = {'guided': 'guided backprop', 'vanilla': 'vanilla gradient',
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


def _box_patch(box: Sequence[int], color: str) -> mpatches.Rectangle:
  top, left, bottom, right = (int(v) for v in box)
  # Pixel k covers [k - 0.5, k + 0.5] in imshow coordinates.
  return mpatches.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                            edgecolor=color, linewidth=1.2)


def _neuron_label(neurons, row: int) -> str:
  return (f'ch {int(neurons.channels[row])} @ ({int(neurons.rows[row])}, '
          f'{int(neurons.cols[row])})\nact {float(neurons.values[row]):.3g}')


def neuron_figure(result, method: str, path: str, title: str) -> str:
  """The input on top, then one row per neuron: its map, the map over its field, the input there.

  `result` is a `guided_backprop.Explanation`.
  """
  image, k = _as_float_image(result.image), len(result.boxes)
  fig = mpl_figure.Figure(figsize=(6.6, 2.1 * (k + 1.4)))
  grid = fig.add_gridspec(k + 1, 3, height_ratios=[1.4] + [1] * k, hspace=0.35, wspace=0.08)
  ax = fig.add_subplot(grid[0, :], xticks=[], yticks=[])
  ax.imshow(image)
  for box in result.boxes:
    ax.add_patch(_box_patch(box, 'yellow'))
  ax.set_title(title, fontsize=9)
  for row, box in enumerate(result.boxes):
    shown = normalize_map(result.maps[method][row])
    axes = [fig.add_subplot(grid[row + 1, col], xticks=[], yticks=[]) for col in range(3)]
    axes[0].imshow(shown)
    axes[0].add_patch(_box_patch(box, 'red'))
    axes[1].imshow(_crop(shown, box))
    axes[2].imshow(_crop(image, box))
    axes[0].set_ylabel(f'{result.layer} {_neuron_label(result.neurons, row)}', fontsize=8)
    if row == 0:
      for ax, name in zip(axes, (_RULE_TITLES[method], 'zoom: receptive field',
                                 'input: receptive field')):
        ax.set_title(name, fontsize=9)
  return save(fig, path, **_TRIMMED)


def comparison_figure(result, path: str) -> str:
  """One row per neuron: the input over its receptive field, then each rule's map there.

  Every map is scaled on its own (the rules differ in magnitude, not only in pattern).
  """
  image, k = _as_float_image(result.image), len(result.boxes)
  rules = ('vanilla', 'deconvnet', 'guided')
  fig = mpl_figure.Figure(figsize=(1.9 * (1 + len(rules)), 1.9 * k + 0.6))
  axes = fig.subplots(k, 1 + len(rules), squeeze=False,
                      subplot_kw={'xticks': [], 'yticks': []})
  for row, box in enumerate(result.boxes):
    axes[row, 0].imshow(_crop(image, box))
    axes[row, 0].set_ylabel(_neuron_label(result.neurons, row), fontsize=8)
    for col, rule in enumerate(rules, start=1):
      axes[row, col].imshow(_crop(normalize_map(result.maps[rule][row]), box))
  for ax, name in zip(axes[0], ['input'] + [_RULE_TITLES[r] for r in rules]):
    ax.set_title(name, fontsize=9)
  fig.suptitle(f'{result.layer} neurons over their receptive fields: three backward rules',
               fontsize=10)
  fig.tight_layout()
  return save(fig, path, **_TRIMMED)


def grad_cam_figure(result, class_name: str, path: str) -> str:
  """Input, Grad-CAM heat map, guided backprop of the class score, and their product."""
  image, gcam = _as_float_image(result.image), result.grad_cam
  fig = mpl_figure.Figure(figsize=(12, 3.4))
  axes = fig.subplots(1, 4, subplot_kw={'xticks': [], 'yticks': []})
  for ax in axes[:2]:
    ax.imshow(image)
  axes[1].imshow(gcam.cam, cmap='jet', alpha=0.45, vmin=0.0, vmax=1.0)
  axes[2].imshow(normalize_map(gcam.class_map))
  axes[3].imshow(normalize_map(gcam.guided_grad_cam))
  prob = float(gcam.probabilities[gcam.class_index])
  for ax, name in zip(axes, (f'predicted: {class_name} ({prob:.0%})', 'Grad-CAM, last conv block',
                             'guided backprop of the class score', 'guided Grad-CAM')):
    ax.set_title(name, fontsize=9)
  fig.tight_layout()
  return save(fig, path, **_TRIMMED)
