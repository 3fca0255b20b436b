"""A progress bar within each epoch on a terminal, as Keras' `fit` shows; silent elsewhere.

When output is not a terminal (CI, sweep logs, a file) nothing is drawn: the metrics writer's
one line per epoch is the whole record. The bar reads the epoch's running sums of the step
before the one just dispatched, at most twice a second, so the loop never waits on the device
for it.
"""

import sys
import time
from typing import TextIO

import numpy as np

_WIDTH = 24


def _clock(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f'{m // 60}:{m % 60:02d}:{s:02d}' if m >= 60 else f'{m}:{s:02d}'


class EpochBar:
  """`epoch  3/30 [=======>      ] 12/30  loss 1.234 acc 0.456  67.1 img/s  ETA 0:09`."""

  def __init__(self, steps_per_epoch: int, batch_size: int, num_epochs: int,
               stream: TextIO | None = None, min_interval_s: float = 0.5):
    self._stream = stream or sys.stdout
    self._on = self._stream.isatty()
    self._spe, self._batch, self._num_epochs = steps_per_epoch, batch_size, num_epochs
    self._interval = min_interval_s
    self._epoch = self._first = 0
    self._t0 = self._last = 0.0
    self._sums = None  # the sums after the previous update's step (already computed)

  def start(self, epoch: int, done_steps: int) -> None:
    """Epoch `epoch` (1-based) begins, or resumes after `done_steps` steps."""
    self._epoch, self._first, self._sums = epoch, done_steps, None
    self._t0 = self._last = time.time()

  def update(self, step_in_epoch: int, sums) -> None:
    """After step `step_in_epoch` was dispatched; `sums` (device) are those of the step before."""
    if not self._on:
      return
    now = time.time()
    if now - self._last >= self._interval and step_in_epoch > self._first + 1:
      self._last = now
      self._draw(step_in_epoch - 1, np.asarray(sums), now - self._t0)

  def _draw(self, done: int, sums: np.ndarray, elapsed: float) -> None:
    loss_sum, correct, count = (float(x) for x in sums)
    rate = (done - self._first) * self._batch / max(elapsed, 1e-9)
    eta = (self._spe - done) * self._batch / max(rate, 1e-9)
    filled = int(_WIDTH * done / self._spe)
    bar = '=' * max(filled - 1, 0) + ('>' if filled else '') + ' ' * (_WIDTH - filled)
    line = (f'epoch {self._epoch:3d}/{self._num_epochs} [{bar}] {done}/{self._spe}  '
            f'loss {loss_sum / max(count, 1):.4f} acc {correct / max(count, 1):.4f}  '
            f'{rate:6.1f} img/s  ETA {_clock(eta)}')
    self._stream.write('\r\033[K' + line)
    self._stream.flush()

  def end(self) -> None:
    """Clears the bar, so the epoch's summary line takes its place."""
    if self._on and self._last > self._t0:
      self._stream.write('\r\033[K')
      self._stream.flush()
