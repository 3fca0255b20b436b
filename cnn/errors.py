"""The one base class of errors a user can fix; `main.py` prints them as one `error:` line, exit 2.

Every module raises `UserError` or a subclass for what the user can fix, with a message that says
what was wrong and how to fix it; anything else is a bug and keeps its traceback.
"""

import contextlib
import errno
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterator


class UserError(Exception):
  """Something the user can fix; the message says what and how."""


class WorkdirError(UserError):
  """The workdir cannot be used for this command (another run's config, no checkpoint, ...)."""


class TrainingDiverged(UserError, RuntimeError):
  """The loss or the parameters became NaN or infinite; checkpoints from before it are kept."""


class DiskFullError(UserError, OSError):
  """A write failed for lack of space; what was written before it is kept."""


def is_disk_full(e: BaseException) -> bool:
  """True for ENOSPC and for libraries (Orbax, TensorStore) that only say it in words."""
  while e is not None:
    if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'no space left on device' in str(e).lower():
      return True
    e = e.__cause__ or e.__context__
  return False


def _free_mib(folder: str) -> float:
  path = os.path.abspath(folder)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free / 2**20


# How long a failed write's threads (Orbax's, TensorStore's) go on printing after it raised.
_STRAGGLERS_S = 1.0


class _HeldStderr:
  """What a block writes to stderr (Python, its threads, C++) held in a file, and written out at
  the end unless `drop` was called."""

  def __enter__(self):
    sys.stderr.flush()
    self._saved, self._file, self._keep = os.dup(2), tempfile.TemporaryFile(), True
    os.dup2(self._file.fileno(), 2)
    return self

  def drop(self) -> None:
    self._keep = False

  def __exit__(self, *exc):
    if not self._keep:
      time.sleep(_STRAGGLERS_S)  # threads of the failed write that are still printing
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    with self._file:
      if self._keep:
        self._file.seek(0)
        sys.stderr.write(self._file.read().decode(errors='replace'))


@contextlib.contextmanager
def disk_full_guard(folder: str, needed_bytes: int, kept: str | Callable[[], str],
                    quiet: bool = False) -> Iterator[None]:
  """Turns a failed write for lack of space inside the block into one DiskFullError line.

  `needed_bytes` estimates what the write needed; `kept` says what survives (e.g. 'the last good
  checkpoint (step 120) is kept'), or is a function that says it when the write has failed.
  `quiet` drops what the block wrote to stderr when it fails for lack of space: Orbax's threads
  print a traceback for every array they could not write.
  """
  with _HeldStderr() if quiet else contextlib.nullcontext() as held:
    try:
      yield
    except DiskFullError:
      raise  # said already, by a guard inside this one
    except Exception as e:  # noqa: BLE001 (any library's wording of ENOSPC)
      if not is_disk_full(e):
        raise
      if held is not None:
        held.drop()
      kept = kept() if callable(kept) else kept
      raise DiskFullError(
          f'no space left on the disk of {folder}: {_free_mib(folder):.1f} MiB free, about '
          f'{_size(needed_bytes)} needed; {kept}. Free some space and run the same command '
          'again') from e


def _size(n: int) -> str:
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{max(n, 1) / 2**10:.0f} KiB'
