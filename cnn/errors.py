"""The one base class of errors a user can fix; `main.py` prints them as one `error:` line, exit 2.

Every module raises a subclass of `UserError` (or `UserError` itself) for bad input, missing or
unusable data, a failed download, a workdir that belongs to another run, a full disk, or a
diverged run; the message says what was wrong and how to fix it. Anything else is a bug and keeps
its traceback.
"""

import contextlib
import errno
import os
import shutil
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


@contextlib.contextmanager
def disk_full_guard(folder: str, needed_bytes: int,
                    kept: str | Callable[[], str]) -> Iterator[None]:
  """Turns a failed write for lack of space inside the block into one DiskFullError line.

  `needed_bytes` estimates what the write needed; `kept` says what survives (e.g. 'the last good
  checkpoint (step 120) is kept'), or is a function that says it when the write has failed.
  """
  try:
    yield
  except DiskFullError:
    raise  # said already, by a guard inside this one
  except Exception as e:  # noqa: BLE001 (any library's wording of ENOSPC)
    if not is_disk_full(e):
      raise
    raise DiskFullError(
        f'no space left on the disk of {folder}: {_free_mib(folder):.1f} MiB free, about '
        f'{needed_bytes / 2**20:.1f} MiB needed; {kept() if callable(kept) else kept}. Free some '
        'space and run the same command again') from e
