"""What the GPU benchmark's child processes measure; experiments/bench_gpu.py starts them.

A child runs one cell (ours, PyTorch eager or torch.compile at one image size, batch size and
dtype) or the end-to-end epoch, and appends each result to its JSON-lines file the moment it
has it: a child killed at the deadline still leaves what it finished.

  python -m experiments.bench_gpu_measure SPEC.json
  SPEC = {"part": a key of PARTS, "args": {...}, "timing": {...}, "results": PATH}

Only numpy is imported at the top: a torch child never loads JAX, and the reverse.
"""

import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator, NamedTuple

import numpy as np

from experiments import bench_measure  # torch_model: the same network as ours

CLASSES = bench_measure.CLASSES
POOL_BATCHES = 4  # a cell's images: this many batches, drawn in a new order each pass


class Timing(NamedTuple):
  rounds: int  # timed rounds; the median round is reported
  steps_per_round: int  # at least this many steps a round
  warmup_steps: int  # untimed steps after the first (compiling) one
  min_round_s: float  # more steps where a round would be shorter (ms steps: timer noise)


def emit(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def synthetic_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, n).astype(np.int32))


def index_batches(n: int, batch: int) -> Iterator[np.ndarray]:
  """Sorted random batches of range(n) without end, reshuffled every pass (as a training run)."""
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  for epoch in itertools.count():
    yield from input_pipeline.batch_indices(n, batch, 0, epoch)


# ---------------------------------------------------------------------------- timing


def _calibrate(step: Callable[[], None], sync: Callable[[], None], timing: Timing) -> int:
  """Warms `step` up; returns the steps a round needs to last min_round_s."""
  sync()
  t = time.perf_counter()
  for _ in range(timing.warmup_steps):
    step()
  sync()
  per_step = (time.perf_counter() - t) / max(timing.warmup_steps, 1)
  return min(1000, max(timing.steps_per_round, math.ceil(timing.min_round_s / max(per_step, 1e-6))))


def timed_rounds(steps: dict[str, Callable[[], None]], sync: Callable[[], None],
                 timing: Timing) -> dict[str, list[float]]:
  """Seconds per step of every round of each of `steps`, interleaved so that load on the
  machine falls on all alike. A round dispatches its steps, then waits once, as training does."""
  counts = {name: _calibrate(step, sync, timing) for name, step in steps.items()}
  out = {name: [] for name in steps}
  for _ in range(timing.rounds):
    for name, step in steps.items():
      t = time.perf_counter()
      for _ in range(counts[name]):
        step()
      sync()
      out[name].append((time.perf_counter() - t) / counts[name])
  return out


def first_call_s(step: Callable[[], None], sync: Callable[[], None]) -> float:
  t = time.perf_counter()
  step()
  sync()
  return time.perf_counter() - t


def summarize(per_step: list[float], first_s: float, batch: int) -> dict:
  med = statistics.median(per_step)
  return {'images_per_s': batch / med, 'median_step_s': med, 'round_step_s': per_step,
          'first_step_s': first_s, 'compile_s': max(0.0, first_s - med)}


# ---------------------------------------------------------------------------- ours


def ours_config(size: int, batch: int, dtype: str, data_aug: bool = False):
  from configs import optimal  # pylint: disable=g-import-not-at-top
  c = optimal.get_config()
  c.image_size, c.batch_size, c.dtype = size, batch, dtype
  c.data_aug = data_aug  # off in the train-step cells, as in the PyTorch step
  return c


def jax_info(config) -> dict:
  """The device, JAX's float32 matmul/conv precision, and the model's forward FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import count  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  precision = getattr(jax.config, 'jax_default_matmul_precision', None)
  model = models.create_model(config, CLASSES)
  return {
      'device_kind': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
      'jax': jax.__version__, 'jax_default_matmul_precision': precision,
      # None is XLA's default, which runs float32 convolutions and dots in TF32 on Ampere and
      # later GPUs; only 'highest'/'float32' asks for full float32.
      'f32_uses_tf32': jax.default_backend() == 'gpu' and precision in (
          None, 'default', 'fastest', 'bfloat16', 'tensorfloat32'),
      # Textbook FLOPs (2 x MACs, cnn.count, what `main.py --mode=count` prints).
      'forward_flops_per_image': count.totals(count.layer_costs(model, config.image_size))['flops'],
  }


def ours_cell(args: dict, timing: Timing, results: str) -> None:
  """Our train step fed from the host (HostFeed) and from device memory (DeviceFeed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import feeding  # pylint: disable=g-import-not-at-top
  from cnn import train  # pylint: disable=g-import-not-at-top
  size, batch, dtype = args['size'], args['batch'], args['dtype']
  config = ours_config(size, batch, dtype)
  base = {**args, 'framework': 'ours', **jax_info(config)}
  n = batch * POOL_BATCHES
  images, labels = synthetic_images(n, size)
  mesh = feeding.make_mesh()
  feeds = {'host': feeding.HostFeed(images, labels, mesh),
           'device': feeding.DeviceFeed(images, labels, mesh)}
  train_step = train.steps_for(train.program_for(config, CLASSES)).train
  hp = train.hyperparams(config, POOL_BATCHES)
  state = [feeding.replicate(train.create_train_state(config, CLASSES, jax.random.PRNGKey(0)),
                             mesh)]

  def stepper(feed):
    order = index_batches(n, batch)

    def step():
      state[0], _ = train_step(state[0], feed(next(order)), hp)  # the state is donated
    return step

  steps = {name: stepper(feed) for name, feed in feeds.items()}
  sync = lambda: jax.block_until_ready(state[0])
  first_s = first_call_s(steps['device'], sync)  # both feeds' batches share one compilation
  for name, per_step in timed_rounds(steps, sync, timing).items():
    emit(results, {**base, 'variant': name, **summarize(per_step, first_s, batch)})


# ---------------------------------------------------------------------------- PyTorch


def torch_info(torch, device: str) -> dict:
  cuda = device == 'cuda'
  return {
      'torch': torch.__version__,
      'device_kind': torch.cuda.get_device_name(0) if cuda else 'cpu',
      'cuda_matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32,
      'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
      'float32_matmul_precision': torch.get_float32_matmul_precision(),
      'cudnn_benchmark': torch.backends.cudnn.benchmark,
      # The convolutions are almost all the FLOPs: cuDNN's setting decides float32's peak.
      'f32_uses_tf32': cuda and torch.backends.cudnn.allow_tf32,
      'adam': 'fused' if cuda else 'foreach',
      'memory_format': 'channels_last',
  }


def _torch_step(torch, net, args: dict, device: str) -> Callable[[], None]:
  """One Adam step of `net` on a batch gathered from a device-resident uint8 set (as DeviceFeed).

  The batch's indices are drawn on the device: a copy from pageable host memory would wait for
  the previous step, and the host could no longer run ahead of the GPU.
  """
  images, labels = synthetic_images(args['batch'] * POOL_BATCHES, args['size'])
  x_all = torch.from_numpy(images).to(device)  # NHWC: a batch's permute is channels-last
  y_all = torch.from_numpy(labels).long().to(device)
  opt = torch.optim.Adam(net.parameters(), lr=bench_measure.LR, fused=device == 'cuda')
  loss_fn = torch.nn.CrossEntropyLoss()
  bf16 = args['dtype'] == 'bfloat16'

  def step():
    i = torch.randperm(len(labels), device=device)[:args['batch']].sort().values
    x = x_all[i].permute(0, 3, 1, 2).float().div_(255.0)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(net(x), y_all[i])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return step


def _torch_variant(args: dict, timing: Timing, results: str, variant: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
  torch.manual_seed(0)
  base = {**args, 'framework': 'torch', 'variant': variant, **torch_info(torch, device)}
  model = bench_measure.torch_model(args['size']).to(device).train()
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  try:
    step = _torch_step(torch, model if variant == 'eager' else torch.compile(model), args,
                       device)
    first_s = first_call_s(step, sync)  # torch.compile compiles here
    per_step = timed_rounds({variant: step}, sync, timing)[variant]
  except Exception as e:  # pylint: disable=broad-except
    if variant == 'eager':
      raise
    emit(results, {**base, 'error': f'{type(e).__name__}: {e}'[:2000]})  # e.g. no compiler
    return
  emit(results, {**base, **summarize(per_step, first_s, args['batch'])})


def torch_eager(args: dict, timing: Timing, results: str) -> None:
  _torch_variant(args, timing, results, 'eager')


def torch_compiled(args: dict, timing: Timing, results: str) -> None:
  """torch.compile(model); a failure to compile is recorded, not raised."""
  _torch_variant(args, timing, results, 'compile')


# ---------------------------------------------------------------------------- end to end


def synthetic_dataset(n_train: int, n_holdout: int, size: int):
  """An input_pipeline.Dataset of random images in memory (no files, no cache)."""
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  train_images, train_labels = synthetic_images(n_train, size, seed=1)
  holdout_images, holdout_labels = synthetic_images(n_holdout, size, seed=2)
  return input_pipeline.Dataset(
      train_images, train_labels, holdout_images, holdout_labels,
      test_images=np.zeros((0, size, size, 3), np.uint8), test_labels=np.zeros(0, np.int32),
      test_paths=[], class_names=[f'class{i}' for i in range(CLASSES)], skipped=[])


def e2e_epoch(args: dict, timing: Timing, results: str) -> None:
  """Two epochs of train_and_evaluate with augmentation; the second is compile-free."""
  del timing
  from cnn import train  # pylint: disable=g-import-not-at-top
  config = ours_config(args['size'], args['batch'], args['dtype'], data_aug=True)
  config.num_epochs, config.early_stopping_patience = 2, 0
  config.wandb_mode, config.download, config.compilation_cache_dir = 'disabled', False, 'off'
  # A tiny hold-out (the dry run's) is not padded to a full eval batch of 128.
  config.eval_batch_size = min(config.eval_batch_size, args['holdout'])
  t = time.perf_counter()
  data = synthetic_dataset(args['images'], args['holdout'], args['size'])
  made_s = time.perf_counter() - t
  with tempfile.TemporaryDirectory(prefix='bench_gpu_e2e_') as workdir:
    t = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir, data=data)
    wall_s = time.perf_counter() - t
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      epochs = [json.loads(line) for line in f if line.strip()]
  last = epochs[-1]
  emit(results, {
      **args, 'framework': 'ours', 'variant': 'e2e', **jax_info(config),
      'epoch_time_s': last['epoch_time_s'], 'images_per_s': last['images_per_second'],
      'first_epoch_time_s': epochs[0]['epoch_time_s'], 'eval_time_s': last['eval_time_s'],
      'time_to_first_step_s': summary.get('time_to_first_step_s'), 'wall_s': wall_s,
      'make_data_s': made_s, 'data_on_device': summary['data_on_device'],
      'epochs': len(epochs)})


PARTS = {'ours': ours_cell, 'torch': torch_eager, 'torch_compile': torch_compiled,
         'e2e': e2e_epoch}


def main(argv: list[str]) -> None:
  with open(argv[1]) as f:
    spec = json.load(f)
  PARTS[spec['part']](spec['args'], Timing(**spec['timing']), spec['results'])


if __name__ == '__main__':
  main(sys.argv)
