"""What the benchmark measures: one framework's train step, input pipeline or training run.

Each function runs in a process of its own (experiments.bench_harness starts it) and returns
plain numbers; nothing here parses flags, starts processes or prints tables.
"""

import os
import pathlib
import statistics
import time
from typing import Callable, NamedTuple

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
  config = _ours_config(size, batch_size, conv_impl, dtype)
  state = [train.create_train_state(config, CLASSES, jax.random.PRNGKey(0))]
  train_step = train.steps_for(train.program_for(config, CLASSES)).train
  hp = train.hyperparams(config, steps_per_epoch=1)

  def step():
    state[0], metrics = train_step(state[0], batch, hp)
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


class E2ERun(NamedTuple):
  """The run both end-to-end measurements make, in keras_e2e's argument order."""
  data_dir: str
  size: int
  batch_size: int
  epochs: int


def ours_e2e(run: E2ERun, workdir: str, cache_dir: str, conv_impl: str) -> dict:
  """cnn.train.train_and_evaluate with the optimal config, from an empty image cache."""
  from cnn import train  # pylint: disable=g-import-not-at-top
  data_dir, size, batch_size, epochs = run
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
