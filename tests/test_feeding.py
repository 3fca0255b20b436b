"""The host feed and the device feed: the same batches, the same run, each resumable."""

import json
import os
import subprocess
import sys

import numpy as np

from cnn import feeding
from cnn import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_feed_gathers_the_host_feeds_batches():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 6, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 40).astype(np.int32)
  mesh = feeding.make_mesh()
  host, device = (feeding.HostFeed(images, labels, mesh),
                  feeding.DeviceFeed(images, labels, mesh))
  for idx in input_pipeline.batch_indices(40, 8, seed=3, epoch=1, start=2):
    a, b = host(idx), device(idx)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['image'], images[idx])


def test_auto_keeps_the_data_on_the_host_on_the_cpu_and_on_or_off_forces_it():
  assert feeding.use_device_feed('on', 10**12, 0.1)
  assert not feeding.use_device_feed('off', 1, 1.0)
  assert not feeding.use_device_feed('auto', 1, 1.0)  # this is the CPU backend


# Three runs on 2 simulated devices: host feed, device feed, device feed stopped after epoch 1
# and resumed. Prints what the test compares.
_RUNS = r'''
import json, sys
sys.path.insert(0, {root!r})
import jax, ml_collections
import numpy as np
from cnn import checkpoints, runs
assert jax.device_count() == 2, jax.devices()
config = ml_collections.ConfigDict(json.loads({config!r}))
out = {{}}
for name, mode, epochs in (('host', 'off', [2]), ('device', 'on', [2]), ('resumed', 'on', [1, 2])):
  config.device_data = mode
  for n in epochs:
    config.num_epochs = n
    summary = runs.train_and_evaluate(config, {workdir!r} + '/' + name)
  leaves = jax.tree_util.tree_leaves(checkpoints.restore_best({workdir!r} + '/' + name)[0])
  with open({workdir!r} + '/' + name + '/metrics.jsonl') as f:
    losses = [json.loads(line)['train_loss'] for line in f]
  out[name] = {{'on_device': summary['data_on_device'], 'losses': losses,
               'params': [np.asarray(x).tolist() for x in leaves]}}
print('RESULT ' + json.dumps(out))
'''


def test_host_and_device_feeds_train_the_same_run_on_two_devices(tiny_config, tmp_path):
  tiny_config.update(dict(batch_norm=True, data_aug=True, dropout=0.2))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu'}
  code = _RUNS.format(root=ROOT, config=json.dumps(tiny_config.to_dict()), workdir=str(tmp_path))
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split('RESULT ', 1)[1])
  assert [out[k]['on_device'] for k in ('host', 'device', 'resumed')] == [False, True, True]
  assert out['host']['losses'] == out['device']['losses'] == out['resumed']['losses']
  for a, b, c in zip(out['host']['params'], out['device']['params'], out['resumed']['params']):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(b, c)  # each feed on its own: bit-identical under resume
