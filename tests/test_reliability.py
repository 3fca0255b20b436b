"""Kills, divergence, clashing workdirs, W&B trouble and shared caches never cost results."""

import glob
import http.server
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tests import conftest
from cnn import checkpoints
from cnn import config as config_lib
from cnn import errors
from cnn import input_pipeline
from cnn import metrics_writer
from cnn import runs
from cnn import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config(tiny_config):
  tiny_config.image_size = 16
  tiny_config.num_epochs = 1
  return tiny_config


# ---------------------------------------------------------------------------- the cache

# Loads the data set in a child process whose decoder is slowed down, so that a build is still
# under way when the parent acts; it reports each image it decodes.
_LOAD = r'''
import json, sys, time
import ml_collections
import numpy as np
from cnn import input_pipeline
config = ml_collections.ConfigDict(json.loads({config!r}))
real_read = input_pipeline.read_image
def slow_read(path, size):
  time.sleep({delay})
  image = real_read(path, size)
  sys.stdout.write(f'decoded {{path}}\n')  # one write: the decoding threads do not interleave
  sys.stdout.flush()
  return image
input_pipeline.read_image = slow_read
ds = input_pipeline.load_dataset(config)
np.savez({out!r}, **{{k: getattr(ds, k) for k in ('train_images', 'train_labels',
                                                 'holdout_images', 'test_images', 'test_labels')}})
print('loaded', flush=True)
'''


def _start_load(config, out: pathlib.Path, delay: float) -> subprocess.Popen:
  """The child's stdout is a pipe; its stderr (progress bars, TF logs) goes to `out`.err."""
  code = _LOAD.format(config=json.dumps(config.to_dict()), out=str(out), delay=delay)
  with open(f'{out}.err', 'w') as err:
    return subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=err, text=True)


def _arrays(ds: input_pipeline.Dataset) -> dict[str, np.ndarray]:
  return {k: getattr(ds, k) for k in ('train_images', 'train_labels', 'holdout_images',
                                      'test_images', 'test_labels')}


@pytest.fixture(scope='module')
def reference(tiny_data_dir, tmp_path_factory):
  """The tiny set at 16 px, loaded once into a cache of its own."""
  c = config_lib.default_config()
  c.update(data_dir=str(tiny_data_dir), cache_dir=str(tmp_path_factory.mktemp('ref_cache')),
           image_size=16)
  return _arrays(input_pipeline.load_dataset(c))


def test_a_kill_during_the_cache_build_does_not_break_the_next_load(config, tmp_path,
                                                                    reference):
  config.cache_dir = str(tmp_path / 'cache')
  total = 78  # 3 classes x (20 train + 6 val)
  kill_after = int(np.random.default_rng().integers(1, total + 1))
  child = _start_load(config, tmp_path / 'never.npz', delay=0.05)
  decoded = 0
  for line in child.stdout:
    decoded += line.startswith('decoded')
    if decoded == kill_after:
      break
  child.kill()  # SIGKILL: no handler, no cleanup
  child.wait()
  assert decoded == kill_after, (tmp_path / 'never.npz.err').read_text()[-3000:]
  assert not (tmp_path / 'never.npz').exists()
  cache = tmp_path / 'cache' / 'image_folder_cache'
  if kill_after < total:  # images were still to come: the build was cut short for sure
    assert [p.name[:11] for p in cache.glob('*/*')] == ['incomplete.']

  ds = input_pipeline.load_dataset(config)
  assert ds.skipped == []
  for name, expected in reference.items():
    np.testing.assert_array_equal(_arrays(ds)[name], expected, err_msg=f'killed after {kill_after}')
  # The build the kill cut short left no half-written dataset beside the finished one.
  assert [p.name for p in cache.glob('*/*')] == ['3.0.0']


def test_two_processes_building_one_cache_at_once_both_get_the_same_data(config, tmp_path,
                                                                          reference):
  config.cache_dir = str(tmp_path / 'cache')
  children = [_start_load(config, tmp_path / f'{i}.npz', delay=0.05) for i in range(2)]
  outs = [c.communicate(timeout=600)[0] for c in children]
  for i, (child, out) in enumerate(zip(children, outs)):
    assert child.returncode == 0, (tmp_path / f'{i}.npz.err').read_text()[-3000:]
    assert out.strip().endswith('loaded')
  # The lock let one of them decode; the other waited and read what it wrote.
  assert sum('decoding 78 images once' in out for out in outs) == 1, outs
  assert sum(out.count('decoded ') for out in outs) == 78
  for i in range(2):
    with np.load(tmp_path / f'{i}.npz') as got:
      for name, expected in reference.items():
        np.testing.assert_array_equal(got[name], expected)


# ---------------------------------------------------------------------------- divergence


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def _diverge(config, workdir) -> tuple[str, int, int]:
  """Trains until TrainingDiverged; (message, step, epoch) it names."""
  with pytest.raises(errors.TrainingDiverged) as e:
    runs.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert '--config.learning_rate' in message and '--config.batch_norm=True' in message, message
  match = re.search(r'NaN/inf .*step (\d+)\D.*epoch (\d+)', message)
  assert match, message
  assert not (workdir / 'summary.json').exists()
  return message, int(match.group(1)), int(match.group(2))


def _kept_checkpoints(config, workdir) -> list[tuple[trainer.TrainState, dict]]:
  """(state, meta) of the latest and the best checkpoint left in `workdir`, those there are."""
  state = trainer.create_train_state(config, 3, jax.random.PRNGKey(0))
  kept = []
  latest = checkpoints.restore_latest(str(workdir), state)
  if latest is not None:
    kept.append(latest)
  if (workdir / 'checkpoints' / 'best').is_dir():
    variables, meta = checkpoints.restore_best(str(workdir))
    kept.append((state.replace(params=variables['params'],
                               batch_stats=variables['batch_stats']), meta))
  return kept


def _holdout_loss(config, state) -> float:
  data = input_pipeline.load_dataset(config)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  loss, _ = trainer.evaluate_arrays(state.model, variables, (data.holdout_images,
                                                             data.holdout_labels),
                                    config.eval_batch_size)
  return loss


# adam at 1e30 makes parameters ~1e30 after one step, whose logits overflow at the next;
# 1e39 is infinite in float32, so the very first update is non-finite while its loss was not.
@pytest.mark.parametrize('learning_rate', [1e30, 1e39])
def test_non_finite_loss_stops_naming_epoch_and_step_and_saves_nothing_non_finite(
    config, tmp_path, learning_rate):
  config.learning_rate = learning_rate
  config.num_epochs = 2
  config.checkpoint_every_steps = 1  # a checkpoint after every step that was fine
  _, bad_step, epoch = _diverge(config, tmp_path)
  assert epoch == 1 and bad_step <= 1
  for state, _ in _kept_checkpoints(config, tmp_path):
    assert int(state.step) <= bad_step
    assert _all_finite(state.params) and _all_finite(state.batch_stats)
    assert _all_finite(state.opt_state)


def test_a_finite_loss_that_leaves_useless_parameters_is_caught_at_validation(config, tmp_path):
  # One step per epoch: its loss is finite, the update it makes sends the hold-out loss to NaN.
  config.learning_rate = 1e12
  config.batch_size = 32
  config.num_epochs = 3
  _diverge(config, tmp_path)
  # Every epoch that was logged (and checkpointed) validated to a finite loss, and so do the
  # checkpoints themselves.
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(m['val_loss']) for m in logged), logged
  for state, meta in _kept_checkpoints(config, tmp_path):
    assert np.isfinite(_holdout_loss(config, state)), meta


def test_divergence_mid_run_keeps_the_last_good_epoch(config, tmp_path, monkeypatch):
  # The loss turns NaN at step 8, inside epoch 2 (6 steps an epoch): as if the run blew up there.
  config.num_epochs = 3
  real_step = trainer.train_step

  def blows_up_at_step_8(state, batch, hp, **kw):
    if int(state.step) == 8:
      state = state.replace(params=jax.tree_util.tree_map(lambda p: p * np.nan, state.params))
    return real_step(state, batch, hp, **kw)

  monkeypatch.setattr(trainer, 'train_step', blows_up_at_step_8)
  _, bad_step, epoch = _diverge(config, tmp_path)
  assert (bad_step, epoch) == (8, 2)
  (logged,) = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  kept = _kept_checkpoints(config, tmp_path)
  (latest, latest_meta), (_, best_meta) = kept
  assert int(latest.step) == 6 and best_meta['epoch'] == 1  # epoch 1 ends at step 6
  assert latest_meta['stopping']['best_epoch'] == 1
  for state, _ in kept:
    assert _holdout_loss(config, state) == pytest.approx(logged['val_loss'], rel=1e-5)


# ---------------------------------------------------------------------------- workdirs


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file()}


def test_a_workdir_with_another_run_is_refused_unless_new_run_keeps_the_old_one(config,
                                                                                tmp_path):
  workdir = tmp_path / 'run'
  first = runs.train_and_evaluate(config, str(workdir))
  old_files = _files(workdir)
  old_params = jax.tree_util.tree_leaves(checkpoints.restore_best(str(workdir))[0])

  config.learning_rate = 0.01
  config.dropout = 0.25
  with pytest.raises(errors.WorkdirError) as e:
    runs.train_and_evaluate(config, str(workdir))
  assert str(e.value) == (
      f'{workdir} holds a run with a different config (dropout: 0.0 -> 0.25, learning_rate: '
      '0.001 -> 0.01). Use another --workdir, resume that run as it was with '
      '--config.dropout=0.0 --config.learning_rate=0.001, or pass --config.new_run=True to keep '
      f'that run under {workdir}/previous_runs/ and start anew')
  assert _files(workdir) == old_files  # not a byte touched
  as_it_was = config.copy_and_resolve_references()
  as_it_was.learning_rate, as_it_was.dropout = 0.001, 0.0  # the flags the message names
  assert runs.train_and_evaluate(as_it_was, str(workdir)) == first

  config.new_run = True
  second = runs.train_and_evaluate(config, str(workdir))
  (kept,) = (workdir / 'previous_runs').iterdir()
  assert time.strptime(kept.name, '%Y%m%d-%H%M%S')
  old_files.pop('lock')  # the workdir's, not the run's: it stays
  assert _files(kept) == old_files  # the earlier run, intact, checkpoints included
  for a, b in zip(old_params, jax.tree_util.tree_leaves(checkpoints.restore_best(str(kept))[0])):
    np.testing.assert_array_equal(a, b)
  assert json.loads((kept / 'summary.json').read_text()) == first
  assert json.loads((workdir / 'summary.json').read_text()) == second
  new_config = json.loads((workdir / 'config.json').read_text())
  assert new_config['learning_rate'] == 0.01 and new_config['dropout'] == 0.25
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1


def _main(config, workdir, **fields):
  """`python main.py` on `config` with `fields` changed: (status, stdout, stderr)."""
  flags = [f'--config.{k}={v}' for k, v in {**config.to_dict(), **fields}.items()
           if not isinstance(v, (tuple, list)) and v != '']
  r = subprocess.run([sys.executable, 'main.py', '--config=configs/default.py',
                      f'--workdir={workdir}', *flags], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  return r.returncode, r.stdout, r.stderr


def _train_losses(workdir):
  return [json.loads(line)['train_loss']
          for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_a_full_disk_is_one_error_line_and_the_same_command_then_resumes_exactly(
    config, small_disk, tmp_path):
  if small_disk is None:
    return  # it ran, and passed, in a user namespace of its own (the fixture says why)
  config.update(num_epochs=3, batch_norm=True, data_aug=True, early_stopping_patience=0)
  status, _, err = _main(config, tmp_path / 'straight')
  assert status == 0, err[-2000:]
  workdir = small_disk.path / 'run'
  status, _, err = _main(config, workdir, num_epochs=1)
  assert status == 0, err[-2000:]
  filler = small_disk.path / 'filler'  # everything but 40 KiB: less than a checkpoint needs
  filler.write_bytes(b'\0' * (os.statvfs(small_disk.path).f_bavail
                              * os.statvfs(small_disk.path).f_frsize - 40 * 1024))
  status, _, err = _main(config, workdir)
  assert status == 2
  assert len(err.splitlines()) == 1, err
  (line,) = err.splitlines()
  assert line.startswith(f'error: no space left on the disk of {workdir}'), line
  assert 'MiB free, about ' in line and 'the last good checkpoint (step 6) is kept' in line, line
  filler.unlink()
  status, _, err = _main(config, workdir)
  assert status == 0, err[-2000:]
  assert not list(small_disk.path.rglob('*tmp*'))
  assert _train_losses(workdir) == _train_losses(tmp_path / 'straight')


class _LiveRun:
  """A child process holding WORKDIR's lock: a training run as `lock` sees it."""

  def __init__(self, workdir):
    self.proc = subprocess.Popen([sys.executable, '-c', (
        'import sys, time; sys.path.insert(0, sys.argv[1]); from cnn import lock\n'
        'with lock.hold(sys.argv[2]):\n  print("held", flush=True); time.sleep(120)'),
        ROOT, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert self.proc.stdout.readline().strip() == 'held'

  def kill(self):
    self.proc.kill()
    self.proc.wait()


def test_a_second_run_on_a_live_runs_workdir_is_refused_and_touches_nothing(config, tmp_path):
  from cnn import lock
  workdir = tmp_path / 'run'
  status, _, err = _main(config, workdir)
  assert status == 0, err[-2000:]
  live = _LiveRun(workdir)
  try:
    before = _files(workdir)
    status, out, err = _main(config, workdir, num_epochs=2)
    assert status == 2 and out == ''
    (line,) = err.splitlines()
    assert line.startswith(f'error: {workdir} is in use by another training run (pid '
                           f'{live.proc.pid} on host '), line
    assert _files(workdir) == before  # byte for byte
    assert lock.holder(str(workdir))['pid'] == live.proc.pid
  finally:
    live.kill()
  status, out, err = _main(config, workdir, num_epochs=2)  # killed: the next run takes over
  assert status == 0 and 'taking over' in out, err[-2000:]


def test_evaluate_beside_a_live_run_writes_only_its_own_files(trained_workdir, tmp_path, capsys):
  from cnn import evaluate
  workdir = pathlib.Path(conftest.copy_workdir(trained_workdir, tmp_path / 'run'))
  live = _LiveRun(workdir)
  try:
    before = _files(workdir)
    evaluate.evaluate(checkpoints.load_run_config(str(workdir)), str(workdir))
    out = capsys.readouterr().out
    assert f'left summary.json as it is: a training run holds {workdir}' in out
    after = _files(workdir)
    assert {k: v for k, v in after.items() if not k.startswith('evaluation/')} == before
  finally:
    live.kill()


# ---------------------------------------------------------------------------- W&B


def _wandb_history(workdir: pathlib.Path) -> tuple[str, list[dict]]:
  """(run id, logged rows) of the single offline run under WORKDIR/wandb."""
  (run_dir,) = glob.glob(str(workdir / 'wandb' / 'offline-run-*'))
  records = conftest.finished_wandb_records(run_dir)
  rows, run_id = [], None
  for r in records:
    kind = r.WhichOneof('record_type')
    if kind == 'run':
      run_id = r.run.run_id
    elif kind == 'history':
      rows.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                   for i in r.history.item})
  return run_id, rows


def _check_logged_offline(workdir: pathlib.Path):
  run_id, rows = _wandb_history(workdir)
  assert run_id == (workdir / 'wandb_run_id.txt').read_text().strip()
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['epoch'], r['val_acc'], r['train_loss']) for r in rows] == [
      (m['epoch'], m['val_acc'], m['train_loss']) for m in metrics]


class _RejectingServer(http.server.BaseHTTPRequestHandler):
  """A W&B server that answers every request with 401, as for a bad or missing API key."""

  def do_POST(self):
    self.rfile.read(int(self.headers.get('Content-Length', 0)))
    self.send_response(401)
    self.send_header('Content-Type', 'application/json')
    self.end_headers()
    self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

  do_GET = do_POST

  def log_message(self, *args):
    pass


@pytest.fixture(params=['nothing_listens', 'key_rejected', 'no_key'])
def wandb_trouble(request, monkeypatch, tmp_path):
  """(kind, server URL) of a W&B server that cannot be used, in a W&B state of its own."""
  import wandb
  if request.param == 'nothing_listens':
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      url = f'http://127.0.0.1:{s.getsockname()[1]}'
    server = None
  else:
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _RejectingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}'
  monkeypatch.setenv('WANDB_BASE_URL', url)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # no ~/.netrc, no saved wandb settings
  if request.param == 'no_key':
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
  else:
    monkeypatch.setenv('WANDB_API_KEY', 'f' * 40)  # looks real, is not
  for name in ('WANDB_MODE', 'WANDB_SWEEP_ID', 'WANDB_RUN_ID', 'WANDB_DIR', 'WANDB_CONFIG_DIR'):
    monkeypatch.delenv(name, raising=False)
  wandb.teardown()  # wandb keeps its settings per process: start from these
  yield request.param, url
  wandb.teardown()
  if server is not None:
    server.shutdown()
    server.server_close()


def test_online_wandb_trouble_falls_back_to_offline_with_one_warning(config, tmp_path, capsys,
                                                                     wandb_trouble):
  kind, url = wandb_trouble
  config.wandb_mode = 'online'
  config.num_epochs = 2
  workdir = tmp_path / 'run'
  t0 = time.perf_counter()
  summary = runs.train_and_evaluate(config, str(workdir))
  elapsed = time.perf_counter() - t0
  out = capsys.readouterr()
  assert summary['status'] == 'completed' and summary['epochs_run'] == 2
  # wandb's own lines (where the offline run is, how to sync it) are not warnings.
  warnings = [line for line in (out.out + out.err).splitlines()
              if re.search('warn|error|fail', line, re.IGNORECASE)]
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith('warning: W&B online failed (')
  if kind == 'nothing_listens':
    assert warnings[0].startswith(f'warning: W&B online failed (cannot reach {url}')
  assert warnings[0].endswith(f'logging offline to {workdir}/wandb instead, upload later with '
                              '`wandb sync`')
  _check_logged_offline(workdir)
  assert elapsed < 120  # no minute-long retrying of a server that is not there


@pytest.mark.parametrize('wandb_trouble', ['key_rejected'], indirect=True)
def test_a_wandb_teardown_that_never_returns_does_not_hang_the_fallback(config, tmp_path,
                                                                         monkeypatch,
                                                                         wandb_trouble):
  # As seen in CI: the failed init's link to wandb's service broke, the teardown request was
  # lost and teardown waited for the service to exit, for ever. Here the first teardown does
  # its work, then waits on `release` the way it waited on that process.
  import wandb
  real, release, calls = wandb.teardown, threading.Event(), []

  def lost_teardown(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(threading.current_thread().name)
    if len(calls) == 1:
      release.wait(timeout=120)

  monkeypatch.setattr(wandb, 'teardown', lost_teardown)
  monkeypatch.setattr(metrics_writer, 'TEARDOWN_TIMEOUT_S', 1.0)
  config.wandb_mode = 'online'
  config.num_epochs = 1
  t0 = time.perf_counter()
  try:
    summary = runs.train_and_evaluate(config, str(tmp_path / 'run'))
  finally:
    elapsed = time.perf_counter() - t0
    release.set()
  assert calls[0] == 'wandb-teardown'
  assert summary['status'] == 'completed' and elapsed < 60
  _check_logged_offline(tmp_path / 'run')


def test_offline_wandb_writes_the_run_under_the_workdir(config, tmp_path, monkeypatch):
  monkeypatch.delenv('WANDB_MODE', raising=False)
  monkeypatch.delenv('WANDB_SWEEP_ID', raising=False)
  config.wandb_mode = 'offline'
  config.num_epochs = 2
  runs.train_and_evaluate(config, str(tmp_path))
  _check_logged_offline(tmp_path)
