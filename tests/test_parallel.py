"""Data parallelism over several devices and bfloat16 compute."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn import checkpoints
from cnn import runs
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One subprocess (a forced 2-device CPU) trains every config it is given: the TensorFlow and
# JAX imports and the data cache are paid once for all of them.
_TRAIN = r'''
import json, sys
sys.path.insert(0, {root!r})
import jax, ml_collections
from cnn import runs
from tests import conftest
assert jax.device_count() == {devices}, jax.devices()
for config, workdir in json.loads({jobs!r}):
  runs.train_and_evaluate(ml_collections.ConfigDict(config), workdir)
'''
CONV_IMPLS = ('xla', 'cpu_eigen')


def _train_on(devices, jobs):
  """Trains each (config, workdir) of `jobs` on `devices` forced host devices."""
  if devices == jax.device_count():  # this process already is such a machine
    for config, workdir in jobs:
      runs.train_and_evaluate(config, str(workdir))
    return
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu'}
  code = _TRAIN.format(root=ROOT, devices=devices,
                       jobs=json.dumps([(c.to_dict(), str(w)) for c, w in jobs]))
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


def _parallel_config(tiny_data_dir, tiny_cache_dir, conv_impl):
  c = conftest.make_tiny_config(tiny_data_dir, tiny_cache_dir)
  c.conv_impl = conv_impl
  c.batch_norm = True  # batch statistics must be over the global batch
  c.data_aug = True
  c.dropout = 0.2
  c.num_epochs = 1
  # SGD keeps float rounding differences (the sum over the batch is split in two) at rounding
  # size; Adam's first steps are sign-like and would blow them up to the learning rate.
  c.optimizer = 'sgd'
  c.learning_rate = 0.05
  return c


@pytest.fixture(scope='module')
def two_device_runs(tiny_data_dir, tiny_cache_dir, tmp_path_factory):
  """conv_impl -> workdir of the same tiny run trained on 2 devices, both in one subprocess."""
  root = tmp_path_factory.mktemp('two')
  runs = {impl: (_parallel_config(tiny_data_dir, tiny_cache_dir, impl), root / impl)
          for impl in CONV_IMPLS}
  _train_on(2, list(runs.values()))
  return {impl: workdir for impl, (_, workdir) in runs.items()}


@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
def test_two_devices_match_one(tiny_data_dir, tiny_cache_dir, two_device_runs, tmp_path,
                               conv_impl):
  _train_on(1, [(_parallel_config(tiny_data_dir, tiny_cache_dir, conv_impl), tmp_path / 'one')])
  one = checkpoints.restore_best(str(tmp_path / 'one'))[0]
  two = checkpoints.restore_best(str(two_device_runs[conv_impl]))[0]
  leaves_one, leaves_two = jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)
  assert len(leaves_one) == len(leaves_two)
  for a, b in zip(leaves_one, leaves_two):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  m1 = [json.loads(line) for line in open(tmp_path / 'one' / 'metrics.jsonl')]
  m2 = [json.loads(line) for line in open(two_device_runs[conv_impl] / 'metrics.jsonl')]
  assert abs(m1[0]['train_loss'] - m2[0]['train_loss']) < 1e-4
  # Each run really had the device count it stands for.
  assert checkpoints.read_json(tmp_path / 'one' / 'summary.json')['num_devices'] == 1
  assert checkpoints.read_json(two_device_runs[conv_impl] / 'summary.json')['num_devices'] == 2


def test_bfloat16_compute_keeps_float32_params_and_learns(tiny_config, tmp_path):
  tiny_config.dtype = 'bfloat16'
  tiny_config.num_epochs = 5
  summary = runs.train_and_evaluate(tiny_config, str(tmp_path))
  variables, _ = checkpoints.restore_best(str(tmp_path))
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables['params'])} == {np.dtype('float32')}
  history = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert summary['best_val_accuracy'] > 0.5
