"""One run per workdir at a time: an OS lock on WORKDIR/lock that dies with its process.

The file holds the holder's pid, host and start time as one JSON line while the lock is held and
is empty once released, so leftover contents under a free lock mean a holder that was killed.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from cnn import errors

# flock is advisory only on some network filesystems (NFS, Lustre): runs there may not see it.


def _read(fd: int) -> dict | None:
  text = os.pread(fd, 1 << 16, 0).decode(errors='replace').strip()
  if not text:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return {}


def _describe(info: dict | None) -> str:
  info = info or {}
  return (f'pid {info.get("pid", "?")} on host {info.get("host", "?")}, '
          f'started {info.get("started", "?")}')


def _lock(fd: int) -> bool:
  """LOCK_EX without waiting on a run; tries for a moment, as holder() takes it for an instant."""
  for _ in range(10):
    with contextlib.suppress(BlockingIOError):
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    time.sleep(0.01)
  return False


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/lock for the block; raises WorkdirError while a live process holds it.

  The descriptor is not inherited across exec; a child forked (not exec'd) inside the block shares
  the lock until it exits.
  """
  os.makedirs(workdir, exist_ok=True)
  # No O_TRUNC: a failed attempt leaves the holder's line as it is.
  fd = os.open(os.path.join(workdir, 'lock'), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if not _lock(fd):
      raise errors.WorkdirError(
          f'{workdir} is in use by another training run ({_describe(_read(fd))}); wait for it '
          'to finish, stop it, or use another --workdir')
    previous = _read(fd)
    if previous is not None:
      print(f'taking over {workdir} from a run that ended without releasing it '
            f'({_describe(previous)})')
    started = datetime.datetime.now().isoformat(sep=' ', timespec='seconds')
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # released: empty, so nobody takes it for a killed holder
  finally:
    os.close(fd)  # closing the last descriptor releases the flock


def holder(workdir: str) -> dict | None:
  """{'pid', 'host', 'started'} of the live process holding WORKDIR/lock, else None."""
  try:
    fd = os.open(os.path.join(workdir, 'lock'), os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None  # free; closing the descriptor releases it at once
  except BlockingIOError:
    return _read(fd) or {}
  finally:
    os.close(fd)
