"""The benchmarks' one process harness: every measurement runs in a fresh Python process.

The CPU benchmark (experiments/benchmark.py) and the GPU one (experiments/bench_gpu.py) start
every child here: one framework's thread pools never run beside another's, a child can get its
own allocator (MALLOC_ENV) or import `cnn` and `configs` from another checkout (`tree`), and one
still running at a deadline is killed with its own children. A child (`python -m
experiments.bench_harness`) reads a JSON spec line on stdin, runs the function of
experiments/bench_measure.py it names, and writes each record as a JSON line on stdout the
moment it has it; all else it prints goes to its log file. A record holds a figure, an 'error'
or a 'skipped' reason (NOT_INSTALLED without the framework's packages).
"""

import contextlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]

MALLOC_ENV = {
    'system': {},
    'hugepages': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
    # Release rate 0: freed pages stay mapped for the next step's buffers.
    'tcmalloc': {'LD_PRELOAD': 'libtcmalloc_minimal.so.4', 'TCMALLOC_RELEASE_RATE': '0'},
}
CHILD_ENV = {'TF_CPP_MIN_LOG_LEVEL': '3'}  # unless set: TensorFlow's C++ logs fill the logs
# What each framework's measurements import beyond ours (the `bench` extra); without it, a
# measurement of that framework is skipped, not an error.
NEEDS = {'keras': ('keras', 'tensorflow'), 'torch': ('torch',)}
NOT_INSTALLED = {'skipped': 'not installed'}


def installed(framework: str) -> bool:
  return all(importlib.util.find_spec(m) is not None for m in NEEDS.get(framework, ()))


def git_describe(path: str | os.PathLike = ROOT) -> str | None:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                          text=True, cwd=path, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def machine() -> dict:
  """The machine measured on: its figures change with it."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'cores': os.cpu_count(), 'cpu_model': model, 'host': platform.node(),
          'load_average_at_start': os.getloadavg() if hasattr(os, 'getloadavg') else None,
          'python': platform.python_version(), 'git': git_describe()}


def log_paths(folder: str):
  """log_path(name): a new numbered file under `folder` for each child's output."""
  os.makedirs(folder, exist_ok=True)
  counter = itertools.count()
  return lambda name: os.path.join(folder, f'{next(counter):02d}_{name.replace(" ", "_")}.log')


class Child:
  """A measurement in a fresh process: `send` it requests, `recv` its records."""

  def __init__(self, measure: str, args: dict, log_path: str, env: dict | None = None,
               tree: str = ''):
    self.log_path = log_path
    with open(log_path, 'w') as log:
      # Its own session: a kill takes its children (torch.compile's workers) with it.
      self.proc = subprocess.Popen(
          [sys.executable, '-m', 'experiments.bench_harness'], cwd=ROOT, text=True,
          env={**CHILD_ENV, **os.environ, **(env or {})}, stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    self._records = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.send({'measure': measure, 'args': args, 'tree': tree})

  def _read(self) -> None:
    for line in self.proc.stdout:
      with contextlib.suppress(json.JSONDecodeError):  # a library's stray print
        self._records.put(json.loads(line))
    self._records.put(None)

  def send(self, request) -> None:
    with contextlib.suppress(OSError):  # it has exited: recv says how
      self.proc.stdin.write(json.dumps(request) + '\n')
      self.proc.stdin.flush()

  def recv(self, timeout: float | None = None) -> dict | None:
    """Its next record; None once it has exited cleanly; an error record once it has failed or
    `timeout` passed (it is then killed)."""
    try:
      record = self._records.get(timeout=timeout)
    except queue.Empty:
      self.kill()
      return {'error': 'killed at the deadline'}
    if record is not None:
      return record
    self._records.put(None)  # every later recv ends too
    if (rc := self.proc.wait()) == 0:
      return None
    with open(self.log_path, errors='replace') as f:
      tail = ' | '.join(line.strip() for line in f.readlines()[-3:])[-1500:]
    return {'error': f'exited with status {rc}: {tail}'}

  def close(self) -> None:
    """Ends its requests and waits for it to exit."""
    with contextlib.suppress(OSError):
      self.proc.stdin.close()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.kill()

  def kill(self) -> None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait()


def run_once(measure: str, args: dict, log_path: str, *, env: dict | None = None,
             timeout: float | None = None) -> list[dict]:
  """Every record of `measure` in a fresh child; an error record ends them when it fails, and
  NOT_INSTALLED stands for them without the packages of args['framework'] (default ours)."""
  if not installed(args.get('framework', 'ours')):
    return [dict(NOT_INSTALLED)]
  child, records = Child(measure, args, log_path, env), []
  end = time.monotonic() + (timeout or 1e9)
  try:
    while (r := child.recv(max(0.0, end - time.monotonic()))) is not None:
      records.append(r)
      if 'error' in r:
        break
  finally:
    child.close()
  return records


class StepWorker:
  """One framework's train step (bench_measure.step_worker) in a child of its own, started on
  first use (with `fresh`, a new one each round), and its times so far, or what stopped it."""

  def __init__(self, args: dict, log_path, env: dict | None = None, tree: str = ''):
    self.args, self.log_path, self.env, self.tree = args, log_path, env, tree
    self.child, self.steps = None, 1
    self.record = ({'first_step_s': [], 'wall_s': [], 'cpu_s': []}
                   if installed(args['framework']) else dict(NOT_INSTALLED))

  def run(self, timing: dict, deadline: float | None, fresh: bool) -> None:
    """One round: steps_per_round steps, or as many more as last min_round_s."""
    if problem(self.record):
      return
    if self.child is None:
      self.child = Child('step_worker', {**self.args, 'warmup_steps': timing['warmup_steps']},
                         self.log_path(), self.env, self.tree)
      if (first := self._recv(deadline)) is None:
        return
      self.record['first_step_s'].append(first.pop('first_step_s'))
      per_step = max(first.pop('warm_step_s'), 1e-6)
      self.steps = min(1000, max(timing['steps_per_round'],
                                 math.ceil(timing['min_round_s'] / per_step)))
      self.record.update(first)  # what the child says of its framework and device
    self.child.send(self.steps)
    if (times := self._recv(deadline)) is None:
      return
    for key in ('wall_s', 'cpu_s'):
      self.record[key].append(times[key])
    if fresh:
      self.close()

  def _recv(self, deadline: float | None) -> dict | None:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    r = self.child.recv(timeout) or {'error': 'the child exited before its steps'}
    if problem(r):
      self.record = r
      self.close()
      return None
    return r

  def close(self) -> None:
    if self.child is not None:
      self.child.close()
      self.child = None

  def summary(self) -> dict:
    """The record with its medians over rounds, images/s and compile_s (first step - median)."""
    r = self.record
    if problem(r):
      return r
    med, first = statistics.median(r['wall_s']), statistics.median(r['first_step_s'])
    return {**r, 'median_step_s': med, 'median_cpu_s': statistics.median(r['cpu_s']),
            'images_per_s': self.args['batch'] / med, 'compile_s': max(0.0, first - med)}


def time_steps(workers: dict[str, StepWorker], timing: dict, *, fresh: bool = False,
               deadline: float | None = None) -> dict[str, dict]:
  """Rounds of every worker's steps in turn, the order reversed every other round, so that load
  from other users of the machine falls on all alike; each worker's summary.

  timing: rounds, steps_per_round, warmup_steps, min_round_s. `deadline` (time.monotonic())
  kills a child still running then."""
  try:
    for i in range(timing['rounds']):
      for w in (list(workers.values()) if i % 2 == 0 else list(workers.values())[::-1]):
        w.run(timing, deadline, fresh)
  finally:
    for w in workers.values():
      w.close()
  return {name: w.summary() for name, w in workers.items()}


def problem(record: dict) -> str | None:
  """'error: ...' or 'skipped: ...' for a record that holds no figure; None for one that does."""
  kind = next((k for k in ('error', 'skipped') if k in record), None)
  return f'{kind}: {record[kind]}' if kind else None


def problems(tree, where: tuple[str, ...] = ()) -> list[str]:
  """'where: error: ...' or 'where: skipped: ...' for each record in nested dicts `tree` that
  holds no figure."""
  if not isinstance(tree, dict):
    return []
  if problem(tree):
    return [f'{" ".join(where)}: {problem(tree)}']
  return [p for k, v in tree.items() for p in problems(v, (*where, str(k)))]


def aligned(rows: list[list[str]]) -> str:
  """Rows of cells as a right-aligned text table."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def _request():
  """The parent's next request to this child; None once it has no more."""
  line = sys.stdin.readline()
  return json.loads(line) if line.strip() else None


def _child() -> None:
  out = os.fdopen(os.dup(1), 'w', buffering=1)  # line-buffered: each record as it comes
  os.dup2(2, 1)  # all else the child prints goes to its log
  spec = json.loads(sys.stdin.readline())
  if spec['tree']:
    sys.path.insert(0, spec['tree'])  # that checkout's cnn and configs
  from experiments import bench_measure  # pylint: disable=g-import-not-at-top
  pipe = types.SimpleNamespace(emit=lambda r: out.write(json.dumps(r) + '\n'), request=_request)
  try:
    bench_measure.MEASURES[spec['measure']](spec['args'], pipe)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    pipe.emit({'error': f'{type(e).__name__}: {e}'[:2000]})


if __name__ == '__main__':
  _child()
