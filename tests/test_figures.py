"""Figure layouts, and the PNGs read back: their size and the panels actually drawn in them."""

import numpy as np
import pytest

from cnn import figures
from tests.conftest import colour_mask, distinct, panels, read_png


@pytest.mark.parametrize('n,expected', [(64, (8, 8)), (32, (4, 8)), (16, (4, 4)), (12, (3, 4)),
                                        (4, (2, 2)), (1, (1, 1)), (7, (3, 3)), (128, (8, 16))])
def test_near_square_grid(n, expected):
  assert figures.near_square_grid(n) == expected


def test_near_square_grid_always_fits_and_stays_square_ish():
  for n in range(1, 300):
    rows, cols = figures.near_square_grid(n)
    assert rows * cols >= n and rows <= cols <= 2 * rows + 1
    assert rows * cols - n < cols  # never a whole empty row


@pytest.mark.parametrize('num_classes,cols', [(10, 3), (12, 3), (8, 4), (5, 6), (3, 6), (2, 6)])
def test_grid_columns(num_classes, cols):
  assert figures.predictions_grid_columns(num_classes) == cols


def test_grid_indices_draw_each_row_from_its_class():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 7)
  grid = figures.predictions_grid_indices(labels, 3, seed=0)
  assert grid.shape == (3, 6)
  for c in range(3):
    row = grid[c][grid[c] >= 0]
    assert len(row) == min(6, np.sum(labels == c)) == len(set(row))
    assert np.all(labels[row] == c)
  assert list(grid[1, 2:]) == [-1] * 4  # class 1 has only two test images
  again = figures.predictions_grid_indices(labels, 3, seed=0)
  other = figures.predictions_grid_indices(labels, 3, seed=1)
  assert np.array_equal(grid, again) and not np.array_equal(grid[0], other[0])


def test_filters_for_display_scales_each_filter_to_0_1():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 5, 3, 6))
  kernel[..., 3] = 0.7  # constant filter
  tiles = figures.filters_for_display(kernel)
  assert tiles.shape == (6, 5, 5, 3)
  f0 = kernel[..., 0]
  np.testing.assert_allclose(tiles[0], (f0 - f0.min()) / (f0.max() - f0.min()))
  assert np.all(tiles[3] == 0.5)
  for j in (0, 1, 2, 4, 5):
    assert tiles[j].min() == 0 and tiles[j].max() == 1


def test_predictions_grid_png_has_one_framed_panel_per_image(tmp_path):
  rng = np.random.default_rng(0)
  names = [f'class_{c}_with_a_long_name' for c in range(10)]
  labels = np.repeat(np.arange(10), 4)
  images = rng.integers(0, 256, (40, 48, 48, 3)).astype(np.uint8)
  probs = rng.dirichlet(np.ones(10), 40)
  probs[::3, :] = 0.01
  probs[np.arange(0, 40, 3), labels[::3]] = 0.91  # every third image confidently right
  grid = figures.predictions_grid_indices(labels, 10, seed=0)
  path = figures.plot_predictions_grid(figures.GridData(images, labels, probs, names), grid,
                                       tmp_path / 'grid.png', 't')
  img = read_png(path)
  assert img.shape[1] == round((2.5 * 3 + 1.5) * figures.DPI)  # 3 columns of 2.5 in + labels
  assert img.shape[0] > 10 * 3.55 * figures.DPI  # 10 rows of 3.55 in + the heading
  shown = grid.ravel()
  right = np.sum(probs[shown].argmax(1) == labels[shown])
  green = panels(colour_mask(img, figures.CORRECT), 100)
  red = panels(colour_mask(img, figures.WRONG), 100)
  assert (len(green), len(red)) == (right, 30 - right)
  frames = green + red
  assert distinct([b[0].start for b in frames]) == 10  # rows
  assert distinct([b[1].start for b in frames]) == 3  # columns


def test_predictions_grid_with_fewer_images_than_cells(tmp_path):
  labels = np.array([0, 0, 0, 0, 1])
  probs = np.eye(2)[[0, 0, 1, 0, 1]] * 0.8 + 0.1
  images = np.full((5, 16, 16, 3), 128, np.uint8)
  grid = figures.predictions_grid_indices(labels, 2, seed=0)  # 2 x 6, seven cells empty
  img = read_png(figures.plot_predictions_grid(figures.GridData(images, labels, probs, ['a', 'b']),
                                               grid, tmp_path / 'g.png', 't'))
  assert len(panels(colour_mask(img, figures.CORRECT), 100)) == 4
  assert len(panels(colour_mask(img, figures.WRONG), 100)) == 1


def test_filters_png_shows_every_kernel_on_the_grid(tmp_path):
  rng = np.random.default_rng(0)
  kernel = rng.uniform(0.1, 0.9, (3, 3, 3, 32))
  kernel[0, 0, :, :] = 0.0  # a dark corner: no tile pixel is white after min-max scaling
  kernel[2, 2, :, :] = 1.0
  kernel[2, 2, 0, :] = 0.95
  img = read_png(figures.plot_first_layer_filters(kernel, tmp_path / 'f.png'))
  tiles = panels(np.any(img < 245, axis=-1), 60)
  assert len(tiles) == 32
  assert distinct([b[0].start for b in tiles]) == 4
  assert distinct([b[1].start for b in tiles]) == 8


def test_activations_png_shows_the_image_and_every_map(tmp_path):
  rng = np.random.default_rng(0)
  maps = rng.uniform(0, 1, (30, 30, 12))
  maps[..., 5] = 0.0  # a dead filter still gets its (dark) panel
  image = rng.integers(0, 200, (32, 32, 3)).astype(np.uint8)
  img = read_png(figures.plot_first_layer_activations(image, maps, tmp_path / 'a.png', 't', 'c'))
  boxes = panels(np.any(img < 245, axis=-1), 80)
  sides = sorted(b[1].stop - b[1].start for b in boxes)
  assert len(boxes) == 12 + 1
  assert sides[-1] > 2.5 * sides[0]  # the input image is drawn much larger than a map
  maps_only = [b for b in boxes if b[1].stop - b[1].start < sides[-1]]
  assert distinct([b[0].start for b in maps_only]) == 3  # 12 maps: 3 x 4
  assert distinct([b[1].start for b in maps_only]) == 4


def test_confusion_matrix_png(tmp_path):
  cm = np.array([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
  img = read_png(figures.plot_confusion_matrix(cm, ['a', 'b', 'c'], tmp_path / 'cm.png', 't'))
  size = max(6.0, 0.75 * 3 + 3.0)
  assert img.shape[:2] == (round(size * figures.DPI), round((size + 1.2) * figures.DPI))
  # The darkest cell is the row-normalised 100% one (b -> b): Blues' end colour, 8,48,107.
  dark = np.all(np.abs(img - [8, 48, 107]) <= 3, axis=-1)
  cells = panels(dark, 40)
  assert len(cells) == 1
