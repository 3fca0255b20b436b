"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

import os
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO], object],
                 binary: bool = False) -> None:
  """Calls `write_fn` on a file beside `path`, then renames it over `path`. The temporary name
  ends like `path` (e.g. `.png`) for writers that go by the suffix."""
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{os.getpid()}{ext}'
  try:
    with open(tmp, 'wb' if binary else 'w') as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
