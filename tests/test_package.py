"""The project installs as a regular package: `cnn` works without the checkout or `configs/`."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_USE_THE_INSTALLED_PACKAGE = r'''
import importlib, json, sys
sys.path.insert(0, {target!r})
import cnn
from cnn import config as config_lib, runs
for mode in ('runs', 'evaluate', 'predict', 'guided_backprop', 'count', 'sweep', 'sweep_report'):
  importlib.import_module('cnn.' + mode)
c = config_lib.default_config()
c.update(data_dir={data_dir!r}, cache_dir={cache_dir!r}, download=False, image_size=32,
         first_layer_filters=4, conv_layers=2, dense_size=8, batch_size=8, eval_batch_size=16,
         num_epochs=1, wandb_mode='disabled', compilation_cache_dir='off')
summary = runs.train_and_evaluate(c, {workdir!r})
print('RESULT ' + json.dumps({{'file': cnn.__file__, 'version': cnn.__version__,
                              'configs': 'configs' in sys.modules,
                              'epochs': summary['epochs_run']}}))
'''


def _builds_wheels_here() -> bool:
  """Whether this environment's setuptools builds a wheel by itself (70.1 and later do; earlier
  ones need the `wheel` package); else pip fetches a build environment."""
  try:
    import setuptools
  except ImportError:
    return False
  version = tuple(int(x) for x in setuptools.__version__.split('.')[:2])
  return version >= (70, 1) or importlib.util.find_spec('wheel') is not None


def _pip_install(source: pathlib.Path, target: pathlib.Path) -> None:
  """`pip install --no-deps --target`: no editable link back to the checkout."""
  cmd = [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', str(target)]
  if _builds_wheels_here():
    cmd.append('--no-build-isolation')  # offline, with this environment's own setuptools
  r = subprocess.run(cmd + [str(source)], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_a_regular_install_imports_every_mode_and_trains_without_the_checkout(
    tmp_path, tiny_data_dir, tiny_cache_dir):
  # A copy of the checkout: parallel test workers must not race on one build folder.
  source = tmp_path / 'source'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '.venv', 'venv', '*.egg-info', 'build', '__pycache__', 'workdirs', 'wandb'))
  target = tmp_path / 'target'
  _pip_install(source, target)
  assert not (target / 'configs').exists()  # configs/ is the checkout's, not the package's
  code = _USE_THE_INSTALLED_PACKAGE.format(target=str(target), data_dir=str(tiny_data_dir),
                                           cache_dir=str(tiny_cache_dir),
                                           workdir=str(tmp_path / 'run'))
  away = tmp_path / 'elsewhere'
  away.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  r = subprocess.run([sys.executable, '-c', code], cwd=away, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.split('RESULT ', 1)[1])
  assert pathlib.Path(result['file']).is_relative_to(target)
  assert result['configs'] is False and result['epochs'] == 1
  assert result['version'] == '0.2.0'
