"""cnn.lock against real processes: a live holder refuses, a killed one is taken over."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from cnn import errors
from cnn import lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Takes the lock, says so through a file, then sleeps until killed or leaves at once ('exit').
CHILD = '''
import pathlib, sys, time
from cnn import lock
with lock.hold(sys.argv[1]):
  pathlib.Path(sys.argv[2]).write_text('ready')
  if sys.argv[3] != 'exit':
    time.sleep(120)
'''


def _wait_until(done, what: str, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while not done():
    assert time.monotonic() < deadline, f'timed out after {timeout}s waiting for {what}'
    time.sleep(0.005)


@pytest.fixture
def start_child(tmp_path):
  children = []

  def start(workdir: pathlib.Path, then: str = 'sleep') -> subprocess.Popen:
    ready = tmp_path / f'ready{len(children)}'
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    child = subprocess.Popen([sys.executable, '-c', CHILD, str(workdir), str(ready), then],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    children.append(child)
    _wait_until(lambda: ready.exists() or child.poll() is not None, 'the child to take the lock')
    assert ready.exists(), child.communicate()[1]
    return child

  yield start
  for child in children:
    if child.poll() is None:
      child.kill()
    child.communicate(timeout=30)


def _kill(child: subprocess.Popen) -> None:
  os.kill(child.pid, signal.SIGKILL)
  child.wait(timeout=30)


def test_live_holder_refuses_and_keeps_its_line(tmp_path, start_child):
  child = start_child(tmp_path)
  before = (tmp_path / 'lock').read_bytes()
  with pytest.raises(errors.WorkdirError) as e:
    with lock.hold(str(tmp_path)):
      pytest.fail('took a lock a live process holds')
  message = str(e.value)
  assert f'{tmp_path} is in use by another training run (pid {child.pid} on host ' \
         f'{socket.gethostname()}, started ' in message
  assert 'use another --workdir' in message and '\n' not in message
  assert (tmp_path / 'lock').read_bytes() == before


def test_killed_holder_is_taken_over(tmp_path, start_child, capsys):
  child = start_child(tmp_path)
  _kill(child)
  with lock.hold(str(tmp_path)):
    assert lock.holder(str(tmp_path))['pid'] == os.getpid()
  out = capsys.readouterr().out
  assert out.startswith(f'taking over {tmp_path} from a run that ended without releasing it '
                        f'(pid {child.pid} on host {socket.gethostname()}, started ')
  assert out.count('\n') == 1
  assert (tmp_path / 'lock').read_text() == ''


def test_clean_exit_releases(tmp_path, start_child, capsys):
  child = start_child(tmp_path, then='exit')
  child.wait(timeout=30)
  assert child.returncode == 0
  for _ in range(2):  # after a clean exit in another process, then in this one
    with lock.hold(str(tmp_path)):
      pass
    assert (tmp_path / 'lock').read_text() == ''
  assert capsys.readouterr().out == ''


def test_holder_sees_only_a_live_process(tmp_path, start_child):
  assert lock.holder(str(tmp_path)) is None  # no lock file yet
  child = start_child(tmp_path)
  info = lock.holder(str(tmp_path))
  assert (info['pid'], info['host']) == (child.pid, socket.gethostname())
  assert set(info) == {'pid', 'host', 'started'}
  _kill(child)
  assert (tmp_path / 'lock').read_text() != ''  # the dead holder's line is still there
  assert lock.holder(str(tmp_path)) is None
