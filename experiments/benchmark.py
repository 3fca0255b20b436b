r"""Train-step, compile, input-pipeline and end-to-end timings: ours vs Keras 3/TF vs PyTorch.

  python -m experiments.benchmark                       # everything, about 10 min on 2 cores
  python -m experiments.benchmark --parts=train_step --sizes=128 --out=/tmp/b.json
  python -m experiments.benchmark --parts=train_step --malloc=system,hugepages,tcmalloc

Every framework runs the same network (5 x [conv 64 k3 VALID, BN, ReLU, 2x2 max-pool], dense
128, BN, ReLU, dropout 0.2, dense 10; Adam 1e-3; batch 32; float32; no augmentation) in a
process of its own, so one framework's thread pools never run beside another's. Ours is
`cnn.train.create_train_state` + `cnn.train.train_step` with configs/optimal.py (and, as
`ours_bf16`, with config.dtype=bfloat16). Keras runs as the reference did: `jit_compile=False`,
`train_on_batch` on in-memory tensors. PyTorch runs eagerly with channels-last tensors (needs
the `bench` extra: `pip install -e .[bench]`).

The train-step part interleaves: each round runs a few steps of every framework in turn and
the medians over rounds are reported, so load from other users of the machine falls on all
frameworks alike. `compile` is the first step's time minus a later one's. `pipeline` times
`cnn.input_pipeline` on full-size photos (decode + cache once, then batches placed on the
devices) against the reference loader, `image_dataset_from_directory`, which decodes every
epoch. `e2e` times `--e2e_epochs` epochs with augmentation, starting from undecoded images, of
`cnn.train.train_and_evaluate` against the reference recipe (that loader with a 10% validation
split, Keras' augmentation layers, `model.fit`).
"""

import json
import multiprocessing
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags

_PARTS = flags.DEFINE_list('parts', ['train_step', 'compile', 'pipeline', 'e2e'],
                           'Parts to run: train_step, compile, pipeline, e2e.')
_SIZES = flags.DEFINE_list('sizes', ['128', '256'], 'Image sizes of the train-step part.')
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['ours', 'ours_bf16', 'keras', 'torch'],
                                'Frameworks of the train-step and compile parts: ours, '
                                'ours_bf16 (config.dtype=bfloat16), keras, torch, flax_nn_conv '
                                '(ours with nn.Conv instead of cnn.layers.Conv).')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Interleaved rounds of the train-step part.')
_STEPS = flags.DEFINE_integer('steps_per_round', 2, 'Timed steps per framework and round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_MALLOC = flags.DEFINE_list(
    'malloc', ['system'],
    'Allocators to run the train-step part under, each for every framework: system (glibc '
    'as is), hugepages (glibc with GLIBC_TUNABLES=glibc.malloc.hugetlb=1), tcmalloc '
    '(LD_PRELOAD of libtcmalloc_minimal.so.4). glibc maps every large buffer afresh, so each '
    'step page-faults all of its activations; the others reuse or map them in 2 MB pages.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', os.environ.get('CNN_TEST_DATA', str(
        pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'monkeys10')),
    'Image folder (train/<class>/, val/<class>/) of the pipeline and e2e parts.')
_FULLRES_DIR = flags.DEFINE_string(
    'fullres_dir', str(pathlib.Path(_DATA_DIR.default).parent / 'monkeys10_fullres_sample'),
    'Full-size photos (train/<class>/) whose decoding the pipeline part times.')
_E2E_SIZE = flags.DEFINE_integer('e2e_size', 128, 'Image size of the pipeline and e2e parts.')
_E2E_EPOCHS = flags.DEFINE_integer('e2e_epochs', 5, 'Epochs of the e2e part.')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Where the JSON results go.')
_CONV_IMPL = flags.DEFINE_enum('conv_impl', 'auto', ['auto', 'cpu_eigen', 'xla'],
                               'Our convolutions: config.conv_impl of the runs timed as ours.')

FILTERS, KERNEL, DENSE, CLASSES, DROPOUT, LR = 64, 3, 128, 10, 0.2, 1e-3


def _quiet_tf():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


# ---------------------------------------------------------------------------- step builders
# Each returns (step, first_call_s): step() runs one training step on a fixed batch and
# returns once its results are computed.


def _batch(size: int, batch_size: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, batch_size).astype(np.int32))


def _ours_config(size: int, batch_size: int, conv_impl: str = 'auto', dtype: str = 'float32',
                 data_aug: bool = False):
  # Flags are parsed in the main process only: workers get conv_impl as an argument.
  from configs import optimal  # pylint: disable=g-import-not-at-top
  c = optimal.get_config()
  c.image_size, c.batch_size = size, batch_size
  c.conv_impl, c.dtype = conv_impl, dtype
  c.data_aug = data_aug  # off in the train-step part, like the Keras and PyTorch steps there
  return c


def build_ours(size: int, batch_size: int, conv_impl: str = 'auto',
               dtype: str = 'float32') -> tuple[Callable[[], None], float]:
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import train  # pylint: disable=g-import-not-at-top
  images, labels = _batch(size, batch_size)
  batch = {'image': jax.device_put(images), 'label': jax.device_put(labels)}
  state = [train.create_train_state(_ours_config(size, batch_size, conv_impl, dtype), CLASSES,
                                    jax.random.PRNGKey(0))]

  def step():
    state[0], metrics = train.train_step(state[0], batch)
    jax.block_until_ready(metrics)

  t = time.perf_counter()
  step()
  return step, time.perf_counter() - t


def build_ours_bf16(size: int, batch_size: int,
                    conv_impl: str = 'auto') -> tuple[Callable[[], None], float]:
  """Ours with config.dtype='bfloat16': bfloat16 compute, float32 parameters."""
  return build_ours(size, batch_size, conv_impl, 'bfloat16')


def build_flax_nn_conv(size: int, batch_size: int,
                       conv_impl: str = '') -> tuple[Callable[[], None], float]:
  """Ours with Flax's own nn.Conv (conv_impl 'xla'): what cnn.layers.Conv gains."""
  del conv_impl
  return build_ours(size, batch_size, 'xla')


def keras_model(size: int):
  """The reference's Sequential model (softmax output, as it was)."""
  import keras  # pylint: disable=g-import-not-at-top
  layers = [keras.Input((size, size, 3))]
  for _ in range(5):
    layers += [keras.layers.Conv2D(FILTERS, KERNEL, padding='valid'),
               keras.layers.BatchNormalization(), keras.layers.Activation('relu'),
               keras.layers.MaxPooling2D(2)]
  layers += [keras.layers.Flatten(), keras.layers.Dense(DENSE), keras.layers.BatchNormalization(),
             keras.layers.Activation('relu'), keras.layers.Dropout(DROPOUT),
             keras.layers.Dense(CLASSES, activation='softmax')]
  model = keras.Sequential(layers)
  model.compile(optimizer=keras.optimizers.Adam(LR), loss='sparse_categorical_crossentropy',
                metrics=['accuracy'], jit_compile=False)
  return model


def build_keras(size: int, batch_size: int,
                conv_impl: str = '') -> tuple[Callable[[], None], float]:
  del conv_impl
  _quiet_tf()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images, labels = _batch(size, batch_size)
  x = tf.constant(images.astype('float32') / 255.0)
  y = tf.constant(labels)
  model = keras_model(size)

  def step():
    model.train_on_batch(x, y)  # returns numpy scalars: the step has finished

  t = time.perf_counter()
  step()
  return step, time.perf_counter() - t


def torch_model(size: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  layers, c, s = [], 3, size
  for _ in range(5):
    # Keras' BN: momentum 0.99 of the old statistics = PyTorch momentum 0.01; epsilon 1e-3.
    layers += [nn.Conv2d(c, FILTERS, KERNEL), nn.BatchNorm2d(FILTERS, eps=1e-3, momentum=0.01),
               nn.ReLU(), nn.MaxPool2d(2)]
    c, s = FILTERS, (s - KERNEL + 1) // 2
  layers += [nn.Flatten(), nn.Linear(c * s * s, DENSE),
             nn.BatchNorm1d(DENSE, eps=1e-3, momentum=0.01), nn.ReLU(), nn.Dropout(DROPOUT),
             nn.Linear(DENSE, CLASSES)]
  return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def build_torch(size: int, batch_size: int,
                conv_impl: str = '') -> tuple[Callable[[], None], float]:
  del conv_impl
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  images, labels = _batch(size, batch_size)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(labels).long()
  model = torch_model(size).train()
  opt = torch.optim.Adam(model.parameters(), lr=LR)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    loss.item()

  t = time.perf_counter()
  step()
  return step, time.perf_counter() - t


BUILDERS = {'ours': build_ours, 'ours_bf16': build_ours_bf16, 'keras': build_keras,
            'torch': build_torch, 'flax_nn_conv': build_flax_nn_conv}


# ---------------------------------------------------------------------------- workers

MALLOC_ENV = {
    'system': {},
    'hugepages': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
    # Release rate 0: freed pages stay mapped for the next step's buffers.
    'tcmalloc': {'LD_PRELOAD': 'libtcmalloc_minimal.so.4', 'TCMALLOC_RELEASE_RATE': '0'},
}


def _step_worker(framework: str, size: int, batch_size: int, conv_impl: str, conn) -> None:
  """Builds one framework's step, reports its first-call time, then runs steps on request."""
  try:
    step, first_s = BUILDERS[framework](size, batch_size, conv_impl)
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


def time_train_steps(frameworks: list[str], size: int, batch_size: int, rounds: int,
                     steps_per_round: int, malloc: str = 'system',
                     conv_impl: str = 'auto') -> dict[str, dict[str, Any]]:
  """Per framework: first-call (compile) time and median step time over interleaved rounds."""
  ctx, workers, results = _ctx(), {}, {}
  try:
    for fw in frameworks:  # built one after another: compile times are not shared
      proc, parent = _start(ctx, MALLOC_ENV[malloc], _step_worker,
                            (fw, size, batch_size, conv_impl))
      msg = parent.recv()
      if 'error' in msg:
        results[fw] = {'error': msg['error']}
        proc.join()
        continue
      workers[fw] = (proc, parent)
      results[fw] = {'first_step_s': msg['first_s'], 'wall_s': [], 'cpu_s': []}
      print(f'  {size}px {fw} ({malloc} malloc): first step {msg["first_s"]:.1f} s', flush=True)
    for _ in range(rounds):
      for fw, (_, conn) in workers.items():
        conn.send(steps_per_round)
        for wall, cpu in conn.recv():
          results[fw]['wall_s'].append(wall)
          results[fw]['cpu_s'].append(cpu)
  finally:
    for proc, conn in workers.values():
      try:
        conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      proc.join(timeout=30)
      if proc.is_alive():
        proc.kill()
  for fw, r in results.items():
    if 'error' in r:
      continue
    med = statistics.median(r['wall_s'])
    r.update(median_step_s=med, min_step_s=min(r['wall_s']),
             median_cpu_s=statistics.median(r['cpu_s']), images_per_s=batch_size / med,
             compile_s=max(0.0, r['first_step_s'] - med))
  return results


# ---------------------------------------------------------------------------- pipeline, e2e


def _run_in_process(fn: Callable[..., dict], *args) -> dict:
  """fn(*args) in a fresh process (its own thread pools and caches); its dict result."""
  proc, parent = _start(_ctx(), MALLOC_ENV[_MALLOC.value[0]], _call_and_send, (fn, args))
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


def fullres_folder(src: str, dst: str) -> str:
  """An image folder whose train/ is `src`/train/ and whose val/ holds one image a class."""
  root = pathlib.Path(dst)
  (root / 'train').mkdir(parents=True)
  for cls in sorted(p for p in (pathlib.Path(src) / 'train').iterdir() if p.is_dir()):
    (root / 'train' / cls.name).symlink_to(cls.resolve(), target_is_directory=True)
    first = sorted(p for p in cls.iterdir() if p.is_file())[0]
    (root / 'val' / cls.name).mkdir(parents=True)
    (root / 'val' / cls.name / first.name).symlink_to(first.resolve())
  return str(root)


def ours_pipeline(data_dir: str, size: int, batch_size: int, cache_dir: str,
                  repeats: int = 3) -> dict:
  """load_dataset cold (decode + cache, median of `repeats` fresh caches) and warm, then
  epochs of batches placed on the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  from cnn import train  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  config = _ours_config(size, batch_size)
  config.data_dir, colds = data_dir, []
  for i in range(repeats):
    config.cache_dir = os.path.join(cache_dir, str(i))
    t = time.perf_counter()
    data = input_pipeline.load_dataset(config)
    colds.append(time.perf_counter() - t)
  cold = statistics.median(colds)
  t = time.perf_counter()
  data = input_pipeline.load_dataset(config)
  warm = time.perf_counter() - t
  n_all = len(data.train_labels) + len(data.holdout_labels) + len(data.test_labels)
  mesh, n = train.make_mesh(), 0
  t = time.perf_counter()
  for epoch in range(3):
    for batch in input_pipeline.train_batches(data.train_images, data.train_labels, batch_size,
                                              0, epoch):
      jax.block_until_ready(train.shard_batch(batch, mesh))
      n += len(batch['label'])
  batches = time.perf_counter() - t
  return {'images': n_all, 'cold_load_s': cold, 'warm_load_s': warm,
          'cold_images_per_s': n_all / cold, 'cached_images_per_s': n / batches}


def keras_pipeline(data_dir: str, size: int, batch_size: int, epochs: int = 7) -> dict:
  """The reference loader, decoding every file every epoch: the median of epochs 2 on.

  Its epochs are bimodal on 2 cores (about 235 or 330-415 img/s, in no fixed order), hence six
  of them and the fastest one reported beside the median.
  """
  _quiet_tf()
  import keras  # pylint: disable=g-import-not-at-top
  ds = keras.utils.image_dataset_from_directory(
      os.path.join(data_dir, 'train'), image_size=(size, size), batch_size=batch_size,
      verbose=False, follow_links=True)
  per_epoch = []
  for _ in range(epochs):
    n, t = 0, time.perf_counter()
    for x, _ in ds:
      n += int(x.shape[0])
    per_epoch.append(n / (time.perf_counter() - t))
  return {'images': n, 'images_per_s': statistics.median(per_epoch[1:]),
          'fastest_images_per_s': max(per_epoch), 'epoch_images_per_s': per_epoch}


def ours_e2e(data_dir: str, size: int, batch_size: int, epochs: int, workdir: str,
             cache_dir: str, conv_impl: str) -> dict:
  """cnn.train.train_and_evaluate with the optimal config, from an empty image cache."""
  from cnn import train  # pylint: disable=g-import-not-at-top
  config = _ours_config(size, batch_size, conv_impl, data_aug=True)
  config.data_dir, config.cache_dir, config.num_epochs = data_dir, cache_dir, epochs
  config.wandb_mode, config.early_stopping_patience, config.download = 'disabled', 0, False
  ends = []

  def on_epoch_end(epoch, metrics):  # after validation, as Keras' on_epoch_end
    ends.append((time.perf_counter(), metrics))
    return False

  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir, epoch_callback=on_epoch_end)
  return {'wall_s': time.perf_counter() - t0, 'epochs': epochs,
          'later_epochs_s': [b[0] - a[0] for a, b in zip(ends, ends[1:])],
          'last_epoch_s': ends[-1][0] - ends[-2][0] if len(ends) > 1 else None,
          'final_val_acc': ends[-1][1]['val_acc']}


def keras_augmentation():
  """Keras 3's layers for the reference's ImageDataGenerator settings (cnn/augment.py's)."""
  import keras  # pylint: disable=g-import-not-at-top
  from cnn import augment  # pylint: disable=g-import-not-at-top
  shift, zoom = augment.SHIFT_FRACTION, augment.ZOOM_RANGE[1] - 1
  return keras.Sequential([
      keras.layers.RandomFlip('horizontal'),
      keras.layers.RandomRotation(augment.ROTATION_DEGREES / 360, fill_mode='nearest'),
      keras.layers.RandomTranslation(shift, shift, fill_mode='nearest'),
      keras.layers.RandomZoom(zoom, zoom, fill_mode='nearest'),
      keras.layers.RandomBrightness(augment.BRIGHTNESS_RANGE[1] - 1, value_range=(0, 1)),
  ])


def keras_e2e(data_dir: str, size: int, batch_size: int, epochs: int) -> dict:
  """The reference recipe: image_dataset_from_directory (10% validation split), augment, fit."""
  _quiet_tf()
  import keras  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  kwargs = dict(image_size=(size, size), batch_size=batch_size, validation_split=0.1, seed=0,
                verbose=False)
  train_dir = os.path.join(data_dir, 'train')
  train_ds = keras.utils.image_dataset_from_directory(train_dir, subset='training', **kwargs)
  val_ds = keras.utils.image_dataset_from_directory(train_dir, subset='validation', **kwargs)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  aug = keras_augmentation()
  train_ds = train_ds.map(lambda x, y: (aug(x / 255.0, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
  val_ds = val_ds.map(lambda x, y: (x / 255.0, y))
  ends = []

  class Timer(keras.callbacks.Callback):

    def on_epoch_end(self, epoch, logs=None):
      ends.append((time.perf_counter(), logs))

  model = keras_model(size)
  t = time.perf_counter()
  model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, callbacks=[Timer()])
  starts = [t] + [e[0] for e in ends[:-1]]
  return {'wall_s': time.perf_counter() - t0, 'epochs': epochs,
          'later_epochs_s': [e[0] - s for e, s in zip(ends[1:], starts[1:])],
          'last_epoch_s': ends[-1][0] - starts[-1],
          'final_val_acc': float(ends[-1][1].get('val_accuracy', float('nan')))}


# ---------------------------------------------------------------------------- report


def machine() -> dict:
  model = platform.processor()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  try:
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return {'cores': os.cpu_count(), 'cpu_model': model, 'load_average_at_start': load,
          'python': sys.version.split()[0], 'git': commit}


def versions(frameworks) -> dict:
  out = {}
  for name in ['jax', 'flax', 'optax'] + [{'keras': 'keras', 'torch': 'torch'}.get(f, '')
                                         for f in frameworks]:
    if not name or name in out:
      continue
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = None
  return out


def _ratios(detail: dict, frameworks: list[str]) -> dict:
  """ours' images/s over each other framework's, per size."""
  speed = lambda d, fw: d.get(fw, {}).get('images_per_s')
  return {s: {f'ours_vs_{fw}': (speed(d, 'ours') / speed(d, fw)
                                if speed(d, 'ours') and speed(d, fw) else None)
              for fw in frameworks if fw != 'ours'} for s, d in detail.items()}


def _fmt(x, spec='.1f'):
  return format(x, spec) if isinstance(x, (int, float)) else '-'


def main(argv):
  del argv
  parts, frameworks = set(_PARTS.value), list(_FRAMEWORKS.value)
  unknown = parts - {'train_step', 'compile', 'pipeline', 'e2e'}
  if unknown:
    raise app.UsageError(f'unknown --parts {sorted(unknown)}')
  sizes = [int(s) for s in _SIZES.value]
  out: dict[str, Any] = {'machine': machine(), 'batch_size': _BATCH.value}
  t_all = time.perf_counter()

  unknown = set(_MALLOC.value) - set(MALLOC_ENV)
  if unknown:
    raise app.UsageError(f'unknown --malloc {sorted(unknown)}; known: {sorted(MALLOC_ENV)}')
  out['malloc'], out['conv_impl'] = _MALLOC.value[0], _CONV_IMPL.value
  if parts & {'train_step', 'compile'}:
    by_malloc = {}
    for malloc in _MALLOC.value:
      detail = by_malloc[malloc] = {}
      for size in sizes:
        print(f'train step at {size}px, {malloc} malloc ...', flush=True)
        detail[str(size)] = time_train_steps(frameworks, size, _BATCH.value, _ROUNDS.value,
                                             _STEPS.value, malloc, _CONV_IMPL.value)
    detail = by_malloc[_MALLOC.value[0]]  # the headline figures: the first allocator's
    pick = lambda d, key: {s: {fw: r.get(key) for fw, r in x.items()} for s, x in d.items()}
    if 'train_step' in parts:
      out['train_step'] = pick(detail, 'images_per_s')
      out['train_step_detail'] = detail
      out['ratios'] = _ratios(detail, frameworks)
      if len(by_malloc) > 1:
        out['train_step_by_malloc'] = {m: pick(d, 'images_per_s') for m, d in by_malloc.items()}
        out['ratios_by_malloc'] = {m: _ratios(d, frameworks) for m, d in by_malloc.items()}
        out['train_step_detail_by_malloc'] = by_malloc
    if 'compile' in parts:
      out['compile_s'] = pick(detail, 'compile_s')

  tmp = tempfile.mkdtemp(prefix='cnn_bench_')
  try:
    if 'pipeline' in parts:
      out['input_pipeline'] = _pipeline_part(out, tmp)
    if 'e2e' in parts:
      out['end_to_end'] = _e2e_part(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  out['versions'] = versions(frameworks)
  out['total_s'] = time.perf_counter() - t_all
  _print_table(out, frameworks)
  pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=2) + '\n')
  print(f'wrote {_OUT.value}')


def _pipeline_part(out: dict, tmp: str) -> dict | None:
  """Decoding the full-size photos: our one-off cache build against Keras' every epoch."""
  if not os.path.isdir(os.path.join(_FULLRES_DIR.value, 'train')):
    print(f'skipping pipeline: no photos at {_FULLRES_DIR.value} (--fullres_dir)')
    return None
  print('input pipeline ...', flush=True)
  data_dir = fullres_folder(_FULLRES_DIR.value, os.path.join(tmp, 'fullres'))
  size = _E2E_SIZE.value
  ours = _run_in_process(ours_pipeline, data_dir, size, _BATCH.value,
                         os.path.join(tmp, 'fullres_cache'))
  keras_ref = _run_in_process(keras_pipeline, data_dir, size, _BATCH.value)
  step = out.get('train_step_detail', {}).get(str(size), {}).get('ours', {})
  ok = 'error' not in ours and 'error' not in keras_ref
  return {'size': size, 'photos': _FULLRES_DIR.value, 'ours': ours, 'keras': keras_ref,
          'ours_cache_build_vs_keras_epoch': (ours['cold_images_per_s'] / keras_ref['images_per_s']
                                              if ok else None),
          'ours_cache_build_vs_keras_fastest_epoch': (
              ours['cold_images_per_s'] / keras_ref['fastest_images_per_s'] if ok else None),
          'ours_cached_vs_train_step': (ours['cached_images_per_s'] / step['images_per_s']
                                        if ok and 'images_per_s' in step else None)}


def _e2e_part(tmp: str) -> dict | None:
  """`--e2e_epochs` epochs with augmentation, from nothing decoded, ours against Keras'."""
  if not os.path.isdir(os.path.join(_DATA_DIR.value, 'train')):
    print(f'skipping e2e: no image folder at {_DATA_DIR.value} (--data_dir)')
    return None
  print('end to end ...', flush=True)
  size, epochs = _E2E_SIZE.value, _E2E_EPOCHS.value
  ours = _run_in_process(ours_e2e, _DATA_DIR.value, size, _BATCH.value, epochs,
                         os.path.join(tmp, 'run'), os.path.join(tmp, 'cache'), _CONV_IMPL.value)
  keras_ref = _run_in_process(keras_e2e, _DATA_DIR.value, size, _BATCH.value, epochs)
  ratio = lambda key: (keras_ref[key] / ours[key]
                       if ours.get(key) and keras_ref.get(key) else None)
  for r in (ours, keras_ref):
    if r.get('later_epochs_s'):
      r['median_later_epoch_s'] = statistics.median(r['later_epochs_s'])
  return {'size': size, 'ours': ours, 'keras': keras_ref,
          'wall_speedup_vs_keras': ratio('wall_s'),
          'epoch_speedup_vs_keras': ratio('median_later_epoch_s')}


def _print_table(out: dict, frameworks: list[str]) -> None:
  m = out['machine']
  print(f'\n{m["cores"]} cores, {m["cpu_model"]}, load average at start '
        f'{_fmt(m["load_average_at_start"][0], ".2f") if m["load_average_at_start"] else "-"}')
  others = [fw for fw in frameworks if fw != 'ours']
  if 'train_step' in out:
    by_malloc = out.get('train_step_by_malloc', {out['malloc']: out['train_step']})
    ratios = out.get('ratios_by_malloc', {out['malloc']: out['ratios']})
    print('train step, images/s (median over interleaved rounds); ours / other')
    width = lambda name: max(9, len(name) + 2)
    print(f'  {"malloc":10s}{"size":>5s}' + ''.join(f'{fw:>{width(fw)}s}' for fw in frameworks)
          + ''.join(f'{"/" + fw:>{width(fw)}s}' for fw in others))
    for malloc, table in by_malloc.items():
      for s, row in table.items():
        print(f'  {malloc:10s}{s:>5s}'
              + ''.join(f'{_fmt(row.get(fw)):>{width(fw)}s}' for fw in frameworks)
              + ''.join(f'{_fmt(ratios[malloc][s].get("ours_vs_" + fw), ".2f"):>{width(fw)}s}'
                        for fw in others))
  if 'compile_s' in out:
    print('first step minus a later one (compilation, tracing), s')
    for s, row in out['compile_s'].items():
      print(f'  {s:>5s}  ' + '  '.join(f'{fw} {_fmt(row.get(fw))}' for fw in frameworks))
  if out.get('input_pipeline'):
    p, o, k = out['input_pipeline'], out['input_pipeline']['ours'], out['input_pipeline']['keras']
    print(f'input pipeline, full-size photos to {p["size"]}px: ours decodes and caches '
          f'{_fmt(o.get("cold_images_per_s"))} img/s once, Keras image_dataset_from_directory '
          f'decodes {_fmt(k.get("images_per_s"))} img/s every epoch (median; fastest epoch '
          f'{_fmt(k.get("fastest_images_per_s"))}): '
          f'{_fmt(p["ours_cache_build_vs_keras_epoch"], ".2f")}x '
          f'({_fmt(p["ours_cache_build_vs_keras_fastest_epoch"], ".2f")}x the fastest); '
          f'ours then serves '
          f'{_fmt(o.get("cached_images_per_s"), ".0f")} img/s from the cache '
          f'({_fmt(p["ours_cached_vs_train_step"], ".0f")}x the train step)')
  if out.get('end_to_end'):
    e, o, k = out['end_to_end'], out['end_to_end']['ours'], out['end_to_end']['keras']
    print(f'end to end at {e["size"]}px, {o.get("epochs")} epochs with augmentation, from '
          f'undecoded images: ours {_fmt(o.get("wall_s"))} s, Keras {_fmt(k.get("wall_s"))} s: '
          f'{_fmt(e["wall_speedup_vs_keras"], ".2f")}x; median epoch after the first (train + '
          f'validation) ours {_fmt(o.get("median_later_epoch_s"))} s, Keras '
          f'{_fmt(k.get("median_later_epoch_s"))} s: {_fmt(e["epoch_speedup_vs_keras"], ".2f")}x')
  print(f'total {out["total_s"]:.0f} s')


if __name__ == '__main__':
  app.run(main)
