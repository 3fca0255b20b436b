"""The benchmark's process harness: every measurement in a fresh, spawned process.

One framework's thread pools never run beside another's, and an allocator (MALLOC_ENV) can be
chosen per process. What runs there comes from experiments.bench_measure.
"""

import multiprocessing
import os
import statistics
import time
from typing import Any, Callable, Mapping, NamedTuple

# (size, batch_size, conv_impl) -> (step, first_call_s): see experiments.bench_measure.
Builder = Callable[[int, int, str], tuple[Callable[[], None], float]]


class StepSetup(NamedTuple):
  """What every framework's train step is built for, in the order a Builder takes them."""
  size: int
  batch_size: int
  conv_impl: str = 'auto'


MALLOC_ENV = {
    'system': {},
    'hugepages': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
    # Release rate 0: freed pages stay mapped for the next step's buffers.
    'tcmalloc': {'LD_PRELOAD': 'libtcmalloc_minimal.so.4', 'TCMALLOC_RELEASE_RATE': '0'},
}


def _step_worker(build: Builder, setup: StepSetup, conn) -> None:
  """Builds one framework's step, reports its first-call time, then runs steps on request."""
  try:
    step, first_s = build(*setup)
    t = time.perf_counter()
    step()  # one more, so that lazy set-up after the first step is not timed either
    conn.send({'first_s': first_s, 'second_s': time.perf_counter() - t})
    while (n := conn.recv()) is not None:
      times = []
      for _ in range(n):
        c, t = time.process_time(), time.perf_counter()
        step()
        times.append((time.perf_counter() - t, time.process_time() - c))
      conn.send(times)
  except Exception as e:  # pylint: disable=broad-except
    conn.send({'error': f'{type(e).__name__}: {e}'})
  finally:
    conn.close()


def _ctx():
  return multiprocessing.get_context('spawn')


def _start(ctx, env: dict[str, str], target, args):
  """A started process with `env` added to this one's environment, and its end of a pipe."""
  parent, child = ctx.Pipe()
  proc = ctx.Process(target=target, args=(*args, child), daemon=True)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    proc.start()  # spawn: a fresh interpreter that starts with this environment
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k)
      else:
        os.environ[k] = v
  child.close()
  return proc, parent


def time_train_steps(builders: Mapping[str, Builder], setup: StepSetup, rounds: int,
                     steps_per_round: int, malloc: str = 'system') -> dict[str, dict[str, Any]]:
  """Per framework (a key of `builders`): first-call (compile) time and median step time over
  interleaved rounds."""
  workers, results = {}, {}
  try:
    _start_step_workers(builders, setup, malloc, workers, results)
    for _ in range(rounds):
      for fw, (_, conn) in workers.items():
        conn.send(steps_per_round)
        for wall, cpu in conn.recv():
          results[fw]['wall_s'].append(wall)
          results[fw]['cpu_s'].append(cpu)
  finally:
    _stop_workers(workers.values())
  for r in results.values():
    if 'error' not in r:
      _summarize_steps(r, setup.batch_size)
  return results


def _start_step_workers(builders: Mapping[str, Builder], setup: StepSetup, malloc: str,
                        workers: dict, results: dict) -> None:
  """Fills `workers` and `results` as it goes, so that the caller stops the ones started even
  when a later start fails."""
  ctx = _ctx()
  for fw, build in builders.items():  # built one after another: no compile runs beside another
    proc, parent = _start(ctx, MALLOC_ENV[malloc], _step_worker, (build, setup))
    msg = parent.recv()
    if 'error' in msg:
      results[fw] = {'error': msg['error']}
      proc.join()
      continue
    workers[fw] = (proc, parent)
    results[fw] = {'first_step_s': msg['first_s'], 'wall_s': [], 'cpu_s': []}
    print(f'  {setup.size}px {fw} ({malloc} malloc): first step {msg["first_s"]:.1f} s',
          flush=True)


def _stop_workers(workers) -> None:
  for proc, conn in workers:
    try:
      conn.send(None)
    except (BrokenPipeError, OSError):
      pass
    proc.join(timeout=30)
    if proc.is_alive():
      proc.kill()


def _summarize_steps(r: dict, batch_size: int) -> None:
  med = statistics.median(r['wall_s'])
  r.update(median_step_s=med, min_step_s=min(r['wall_s']),
           median_cpu_s=statistics.median(r['cpu_s']), images_per_s=batch_size / med,
           compile_s=max(0.0, r['first_step_s'] - med))


def run_in_process(fn: Callable[..., dict], malloc: str, *args) -> dict:
  """fn(*args) in a fresh process (its own thread pools and caches) under `malloc`; its dict
  result, or {'error': ...}."""
  proc, parent = _start(_ctx(), MALLOC_ENV[malloc], _call_and_send, (fn, args))
  result = parent.recv()
  proc.join()
  return result


def _call_and_send(fn, args, conn) -> None:
  try:
    conn.send(fn(*args))
  except Exception as e:  # pylint: disable=broad-except
    conn.send({'error': f'{type(e).__name__}: {e}'})
  finally:
    conn.close()
