"""A tqdm bar within each epoch on a terminal, as Keras' `fit` shows; silent elsewhere.

When output is not a terminal (CI, sweep logs, a file) nothing is drawn: the metrics writer's
one line per epoch is the whole record. The bar reads the epoch's running sums of the step
before the one just dispatched, at most twice a second, so the loop never waits on the device
for it.
"""

import sys
import time
from typing import TextIO

import numpy as np
import tqdm


class EpochBar:
  """`epoch 3/30:  40%|████      | 768/1920 [00:11<00:17, 67.1img/s, loss 1.2340 acc 0.4560]`."""

  def __init__(self, steps_per_epoch: int, batch_size: int, num_epochs: int,
               stream: TextIO | None = None, min_interval_s: float = 0.5):
    self._stream = stream or sys.stdout
    self._spe, self._batch, self._num_epochs = steps_per_epoch, batch_size, num_epochs
    self._interval = min_interval_s
    self._bar, self._last = None, 0.0

  def start(self, epoch: int, done_steps: int) -> None:
    """Epoch `epoch` (1-based) begins, or resumes after `done_steps` steps."""
    self.end()
    # Counted in steps, shown in images (unit_scale), so the rate is images per second.
    self._bar = tqdm.tqdm(total=self._spe, initial=done_steps, unit='img', unit_scale=self._batch,
                          desc=f'epoch {epoch}/{self._num_epochs}', file=self._stream,
                          leave=False, disable=not self._stream.isatty(), mininterval=0,
                          delay=self._interval)  # not drawn before its first update
    self._last = time.time()

  def update(self, step_in_epoch: int, sums) -> None:
    """After step `step_in_epoch` was dispatched; `sums` (device) are those of the step before."""
    now = time.time()
    if self._bar is None or self._bar.disable or now - self._last < self._interval:
      return
    self._last = now
    loss_sum, correct, count = (float(x) for x in np.asarray(sums))
    self._bar.set_postfix_str(f'loss {loss_sum / max(count, 1):.4f} acc '
                              f'{correct / max(count, 1):.4f}', refresh=False)
    self._bar.update(step_in_epoch - 1 - self._bar.n)

  def end(self) -> None:
    """Clears the bar, so the epoch's summary line takes its place."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
