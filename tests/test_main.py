"""The command line as a user types it."""

import json
import os
import socket
import subprocess
import sys

from absl import flags
from absl import logging
import pytest

import main
from cnn import checkpoints
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def _main(*args, timeout=900):
  return subprocess.run([sys.executable, 'main.py', *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=timeout)


def _tiny_flags(config):
  keys = ('data_dir', 'cache_dir', 'image_size', 'first_layer_filters', 'conv_layers',
          'dense_size', 'batch_size', 'num_epochs', 'wandb_mode')
  return [f'--config.{k}={config[k]}' for k in keys]


def test_train_then_rerun_is_instant(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  first = _main('--config=configs/default.py', f'--workdir={workdir}', *_tiny_flags(tiny_config))
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'epoch   2/2' in first.stdout
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['epochs_run'] == 2 and summary['status'] == 'completed'
  for name in ('config.json', 'metrics.jsonl', 'checkpoints/latest', 'checkpoints/best'):
    assert os.path.exists(os.path.join(workdir, name)), name
  second = _main('--config=configs/default.py', f'--workdir={workdir}', *_tiny_flags(tiny_config))
  assert second.returncode == 0 and 'already complete' in second.stdout


@pytest.fixture
def run_main(monkeypatch, capsys):
  """`python main.py ARGS` in this process (no interpreter start): (exit status, stderr)."""
  verbosity = logging.get_verbosity()

  def reset_flags():
    for name in [n for n in FLAGS if n.startswith('config.')]:
      delattr(FLAGS, name)  # defined by an earlier parse's --config.FIELD; would be a duplicate
    FLAGS.unparse_flags()

  def run(*args):
    # The command line parses the default --config when main is imported; here it is parsed now.
    config = [] if any(a.startswith('--config=') for a in args) else ['--config=configs/default.py']
    argv = ['main.py', *config, *args]
    monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
    reset_flags()
    try:
      status = main.run(main.parse_flags(argv))
    except SystemExit as e:
      status = e.code
    return status, capsys.readouterr().err

  yield run
  reset_flags()
  logging.set_verbosity(verbosity)


def _workdir_without_checkpoint(path) -> str:
  path.mkdir()
  checkpoints.save_run_config(str(path), default.get_config())
  return str(path)


# mode -> (arguments given a tmp_path, what the error line must say). Each is an error a user
# makes and can fix; all fail before any training or data loading.
USER_ERRORS = {
    'train': (lambda t: ['--config=configs/optimal.py', '--config.image_size=64',
                         f'--workdir={t}/w'],
              'image_size=64 is too small'),
    'evaluate': (lambda t: ['--mode=evaluate', f'--workdir={t}'],
                 'the workdir of a training run?'),
    'predict': (lambda t: ['--mode=predict', f'--workdir={_workdir_without_checkpoint(t / "w")}',
                           f'{t}/missing.jpg'],
                'no best checkpoint in'),
    'guided_bp': (lambda t: ['--mode=guided_bp', f'--workdir={t}/never_trained'],
                  'the workdir of a training run?'),
    'count': (lambda t: ['--mode=count', '--config.conv_layers=0'],
              'conv_layers=0 must be a positive integer'),
    'sweep': (lambda t: ['--mode=sweep', f'--workdir={t}/s', f'--sweep_config={t}/missing.yaml'],
              'cannot read sweep config'),
    'sweep_report': (lambda t: ['--mode=sweep_report', f'--workdir={t}'],
                     'run a sweep there first'),
    'usage': (lambda t: ['--mode=evaluate'], '--mode=evaluate needs --workdir=DIR'),
    'flag': (lambda t: ['--mode=bogus'], 'flag --mode=bogus: value should be one of'),
    'config_field': (lambda t: ['--config.image_sze=64'],
                     '--config.image_sze is not a field of the config'),
    'config_file': (lambda t: [f'--config={t}/missing.py'],
                    'No such file or directory'),
}


@pytest.mark.parametrize('case', USER_ERRORS)
def test_a_user_error_is_one_line_and_exit_status_2(run_main, tmp_path, case):
  args, says = USER_ERRORS[case]
  status, err = run_main(*args(tmp_path))
  assert status == 2, err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert says in err and 'Traceback' not in err
  assert not (tmp_path / 'w' / 'checkpoints' / 'latest').exists()  # nothing was trained


def test_bad_override_says_the_smallest_size_and_creates_nothing(run_main, tmp_path):
  _, err = run_main('--config=configs/optimal.py', '--config.image_size=64',
                    f'--workdir={tmp_path}/w')
  assert '--config.image_size=94' in err
  assert not os.path.exists(tmp_path / 'w')


def test_no_data_and_no_network_is_one_line(tmp_path):
  """The whole command line, as on a machine without the data and without a network."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  data_dir = tmp_path / 'data' / 'inaturalist_12K'
  r = _main('--config=configs/optimal.py', f'--workdir={tmp_path}/run',
            f'--config.data_dir={data_dir}', f'--config.cache_dir={tmp_path}/cache',
            f'--config.dataset_url=http://127.0.0.1:{port}/nature_12K.zip',
            '--config.wandb_mode=disabled', timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  # TensorFlow's CUDA stub may log lines of its own as it loads, before any Python runs.
  lines = r.stderr.splitlines()
  assert [line for line in lines if line.startswith('error:')] == lines[-1:], r.stderr
  assert lines[-1].startswith('error: could not download ') and 'Traceback' not in r.stderr
  assert f'Put the data at {data_dir}' in lines[-1] and '--config.data_dir=PATH' in lines[-1]


@pytest.mark.slow
def test_optimal_config_learns_real_photos(monkeys_dir, tmp_path):
  r = _main('--config=configs/optimal.py', f'--workdir={tmp_path}/run',
            f'--config.data_dir={monkeys_dir}', f'--config.cache_dir={tmp_path}/cache',
            '--config.image_size=96', '--config.num_epochs=4', '--config.wandb_mode=disabled',
            timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.load(open(tmp_path / 'run' / 'summary.json'))
  assert summary['num_params'] > 0 and len(summary['class_names']) == 10
  history = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  # Chance is 0.10. With the running batch-norm averages alone (momentum 0.99, 30 steps an
  # epoch) validation said 0.22-0.27 here; precise BN scores what the model learned (0.54-0.67
  # after epochs 2-4 of seed 0).
  assert history[-1]['train_acc'] >= 0.4 and history[-1]['train_loss'] < history[0]['train_loss']
  assert summary['best_val_accuracy'] >= 0.45, summary


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('mode', ['train', 'evaluate', 'predict', 'guided_bp'])
def test_a_workdir_of_version_0_1_is_one_error_line_in_every_mode_and_left_as_it_is(
    run_main, tmp_path, mode):
  workdir = tmp_path / 'old'
  (workdir / 'checkpoints' / 'latest' / '6').mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(default.get_config().to_dict()))  # no version
  before = _files(workdir)
  status, err = run_main(f'--mode={mode}', f'--workdir={workdir}', 'photo.jpg'
                         if mode == 'predict' else '--config.wandb_mode=disabled')
  assert status == 2
  assert err.strip() == (
      f'error: {workdir} was written by version 0.1.x of this code, whose checkpoints version '
      '0.2.0 does not read; it is left as it is. Train into a new --workdir, or use version 0.1 '
      'for this one (CHANGELOG.md says how)')
  assert _files(workdir) == before
