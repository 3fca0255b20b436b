"""Data parallelism over several devices and bfloat16 compute."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn import checkpoints
from cnn import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = r'''
import json, sys
sys.path.insert(0, {root!r})
import jax, ml_collections
from cnn import train
assert jax.device_count() == {devices}, jax.devices()
config = ml_collections.ConfigDict(json.loads({config!r}))
train.train_and_evaluate(config, {workdir!r})
'''


def _train_on(devices, config, workdir):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu'}
  code = _TRAIN.format(root=ROOT, devices=devices, config=json.dumps(config.to_dict()),
                       workdir=str(workdir))
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return checkpoints.restore_best(str(workdir))[0]


@pytest.mark.parametrize('conv_impl', ['xla', 'cpu_eigen'])
def test_two_devices_match_one(tiny_config, tmp_path, conv_impl):
  tiny_config.conv_impl = conv_impl
  tiny_config.batch_norm = True  # batch statistics must be over the global batch
  tiny_config.data_aug = True
  tiny_config.dropout = 0.2
  tiny_config.num_epochs = 1
  # SGD keeps float rounding differences (the sum over the batch is split in two) at rounding
  # size; Adam's first steps are sign-like and would blow them up to the learning rate.
  tiny_config.optimizer = 'sgd'
  tiny_config.learning_rate = 0.05
  one = _train_on(1, tiny_config, tmp_path / 'one')
  two = _train_on(2, tiny_config, tmp_path / 'two')
  leaves_one, leaves_two = jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)
  assert len(leaves_one) == len(leaves_two)
  for a, b in zip(leaves_one, leaves_two):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  m1 = [json.loads(l) for l in open(tmp_path / 'one' / 'metrics.jsonl')]
  m2 = [json.loads(l) for l in open(tmp_path / 'two' / 'metrics.jsonl')]
  assert abs(m1[0]['train_loss'] - m2[0]['train_loss']) < 1e-4


def test_bfloat16_compute_keeps_float32_params_and_learns(tiny_config, tmp_path):
  tiny_config.dtype = 'bfloat16'
  tiny_config.num_epochs = 5
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  variables, _ = checkpoints.restore_best(str(tmp_path))
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables['params'])} == {np.dtype('float32')}
  history = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert summary['best_val_accuracy'] > 0.5
