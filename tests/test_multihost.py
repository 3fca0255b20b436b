"""Multi-host training for real: two processes on 127.0.0.1 with one CPU device each (gloo)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# main.py, with a train step that sends this process `signal` once the state reaches `at`.
_MAIN = r'''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = {main!r}
from absl import app
from cnn import trainer
import main
at, sig = {at}, {sig}
real_step = trainer.train_step
def train_step(state, batch, hp, **kw):
  out = real_step(state, batch, hp, **kw)
  if at >= 0 and int(out[0].step) == at:
    os.kill(os.getpid(), sig)
  return out
trainer.train_step = train_step
app.run(main.run, flags_parser=main.parse_flags)
'''


def _flags(config, workdir):
  c = config
  return [f'--workdir={workdir}', '--config=configs/default.py', f'--config.data_dir={c.data_dir}',
          f'--config.cache_dir={c.cache_dir}', '--config.download=False',
          '--config.image_size=32', '--config.first_layer_filters=4', '--config.conv_layers=2',
          '--config.dense_size=8', '--config.batch_size=8', '--config.eval_batch_size=16',
          '--config.num_epochs=3', '--config.data_aug=True', '--config.batch_norm=True',
          '--config.dropout=0.2', '--config.wandb_mode=offline',
          '--config.early_stopping_patience=0']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'WANDB_SILENT': 'true',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  env.pop('PYTHONPATH', None)
  return env


def _start(config, workdir, process=None, at=-1, sig=signal.SIGTERM):
  """main.py as process (port, id) of a two-process run, or alone on two devices."""
  code = _MAIN.format(root=str(ROOT), main=str(ROOT / 'main.py'), at=at, sig=int(sig))
  flags = _flags(config, workdir)
  port = process[0] if process else None
  if process:
    flags += [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={process[1]}']
  return subprocess.Popen([sys.executable, '-c', code, *flags], cwd=ROOT,
                          env=_env(1 if port else 2), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _two_processes(config, workdir, **kill):
  """Runs both processes; kill = dict(at=STEP, sig=SIGNAL) for process 1. (rc, out, err) each."""
  port = _free_port()
  procs = [_start(config, workdir, (port, 0)), _start(config, workdir, (port, 1), **kill)]
  outputs = [p.communicate(timeout=300) for p in procs]
  return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def one_process_two_devices(tiny_data_dir, tiny_cache_dir, tmp_path_factory):
  from tests import conftest
  config = conftest.make_tiny_config(tiny_data_dir, tiny_cache_dir)
  workdir = tmp_path_factory.mktemp('one_process')
  p = _start(config, workdir)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  return config, workdir


def _assert_same_training(workdir, reference):
  ours, ref = _metrics(workdir), _metrics(reference)
  assert [m['epoch'] for m in ours] == [1, 2, 3]  # one line an epoch: only process 0 writes
  np.testing.assert_allclose([m['train_loss'] for m in ours], [m['train_loss'] for m in ref],
                             rtol=1e-4)
  assert [m['val_acc'] for m in ours] == [m['val_acc'] for m in ref]


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices(one_process_two_devices,
                                                             tmp_path):
  config, reference = one_process_two_devices
  workdir = tmp_path / 'run'
  (rc0, out0, err0), (rc1, out1, err1) = _two_processes(config, workdir)
  assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['num_processes'] == 2 and summary['num_devices'] == 2  # one device each
  _assert_same_training(workdir, reference)
  assert 'epoch   1/3' in out0 and 'epoch   1/3' not in out1  # process 0 reports
  assert len(list((workdir / 'wandb').glob('offline-run-*'))) == 1  # one W&B run, process 0's
  r = subprocess.run([sys.executable, 'main.py', '--mode=evaluate', f'--workdir={workdir}',
                      '--config.wandb_mode=disabled'], cwd=ROOT, env=_env(1),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'test_accuracy' in json.loads((workdir / 'evaluation' / 'test_metrics.json').read_text())


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_same_command_resumes(
    one_process_two_devices, tmp_path):
  config, reference = one_process_two_devices
  workdir = tmp_path / 'run'
  (rc0, _, err0), (rc1, _, err1) = _two_processes(config, workdir, at=4, sig=signal.SIGTERM)
  assert rc0 != 0 and rc1 != 0
  saved = [line for line in (err0 + err1).splitlines() if line.startswith('SIGTERM: saved')]
  assert len(saved) == 2 and saved[0] == saved[1], err0[-2000:] + err1[-2000:]
  assert not (workdir / 'summary.json').exists()
  (rc0, out0, err0), (rc1, _, err1) = _two_processes(config, workdir)
  assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
  assert 'resuming' in out0
  _assert_same_training(workdir, reference)


@pytest.mark.slow
def test_a_process_killed_hard_makes_the_other_exit_with_one_error_line(tiny_config, tmp_path):
  (rc0, _, err0), (rc1, _, _) = _two_processes(tiny_config, tmp_path / 'run', at=4,
                                               sig=signal.SIGKILL)
  assert rc1 == -signal.SIGKILL
  assert rc0 == 2, err0[-2000:]
  (line,) = [x for x in err0.splitlines() if x.startswith('error:')]
  assert 'process 0 of 2 lost the rest of the run' in line and 'same command' in line


@pytest.mark.slow
def test_a_workdir_a_live_run_holds_refuses_both_processes(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time; sys.path.insert(0, sys.argv[1]); from cnn import lock\n'
      'with lock.hold(sys.argv[2]):\n  print("held", flush=True); time.sleep(120)'),
      str(ROOT), str(workdir)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    results = _two_processes(tiny_config, workdir)
  finally:
    holder.kill()
    holder.wait()
  for rc, _, err in results:
    assert rc == 2, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith('error:')]
    assert f'{workdir} is in use by another training run' in line
  assert sorted(p.name for p in workdir.iterdir()) == ['lock']  # nothing else was written
