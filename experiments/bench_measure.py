"""What the benchmarks measure, each run in a child process of experiments/bench_harness.py.

Every framework trains the same network: 5 x [conv 64 k3 VALID, BN, ReLU, 2x2 max-pool], dense
128, BN, ReLU, dropout 0.2, dense 10; Adam 1e-3. Ours is configs/optimal.py (`ours_config`, the
one place the benchmarks build it), without augmentation in the train-step measurements.

A measure is `fn(args, pipe)`: it sends its records with `pipe.emit` and (the train-step worker,
the same for the CPU and GPU benchmarks) takes requests with `pipe.request()`. Only the standard
library and numpy are imported at the top: a PyTorch child never loads JAX, and a child of
another checkout imports that checkout's `cnn` and `configs`.
"""

import itertools
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

FILTERS, KERNEL, DENSE, CLASSES, DROPOUT, LR = 64, 3, 128, 10, 0.2, 1e-3
POOL_BATCHES = 4  # a train step's images: this many batches, drawn in a new order each pass
# Ours as the CPU train-step part's --frameworks name it: config fields beside size and batch.
OURS = {'ours': {}, 'ours_bf16': {'dtype': 'bfloat16'}, 'flax_nn_conv': {'conv_impl': 'xla'}}


def random_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, n).astype(np.int32))


def ours_config(**fields):
  """configs/optimal.py without augmentation, with `fields` changed."""
  from configs import optimal  # pylint: disable=g-import-not-at-top
  config = optimal.get_config()
  config.update({'data_aug': False, **fields})
  return config


def old_train_step(config, steps_per_epoch: int) -> tuple:
  """(state, step, hyperparameters) of a checkout whose core is cnn/train.py (--compare_with)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import train  # pylint: disable=g-import-not-at-top
  return (train.create_train_state(config, CLASSES, jax.random.PRNGKey(0)),
          train.steps_for(train.program_for(config, CLASSES)).train,
          train.hyperparams(config, steps_per_epoch))


def train_step_of(config, steps_per_epoch: int) -> tuple:
  """(state, step, hyperparameters) of our train step for `config`; step(state, batch, hp)."""
  import cnn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # By its file: an editable install's import finder would find cnn.trainer in its own checkout.
  if not pathlib.Path(cnn.__file__).with_name('trainer.py').exists():
    return old_train_step(config, steps_per_epoch)
  from cnn import trainer  # pylint: disable=g-import-not-at-top
  return (trainer.create_train_state(config, CLASSES, jax.random.PRNGKey(0)), trainer.train_step,
          trainer.hyperparams(config, steps_per_epoch))


def jax_info(config) -> dict:
  """The code timed, the device, JAX's float32 matmul/conv precision, the forward FLOPs."""
  import cnn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import count  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  precision = getattr(jax.config, 'jax_default_matmul_precision', None)
  model = models.create_model(config, CLASSES)
  return {
      'cnn': str(pathlib.Path(cnn.__file__).parent), 'device_kind': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'jax': jax.__version__, 'jax_default_matmul_precision': precision,
      # None is XLA's default, which runs float32 convolutions and dots in TF32 on Ampere and
      # later GPUs; only 'highest'/'float32' asks for full float32.
      'f32_uses_tf32': jax.default_backend() == 'gpu' and precision in (
          None, 'default', 'fastest', 'bfloat16', 'tensorfloat32'),
      # Textbook FLOPs (2 x MACs, cnn.count, what `main.py --mode=count` prints).
      'forward_flops_per_image': count.totals(count.layer_costs(model, config.image_size))['flops'],
  }


def _ours_step(args: dict) -> tuple:
  """Fed as training feeds it: sliced on the host (feed 'host') or gathered on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import feeding  # pylint: disable=g-import-not-at-top
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  fields = {'conv_impl': args.get('conv_impl', 'auto'), 'dtype': args.get('dtype', 'float32'),
            **OURS[args['framework']]}
  config = ours_config(image_size=args['size'], batch_size=args['batch'], **fields)
  state, train_step, hp = train_step_of(config, POOL_BATCHES)
  images, labels = random_images(args['batch'] * POOL_BATCHES, args['size'])
  mesh = feeding.make_mesh()
  feed = (feeding.DeviceFeed if args.get('feed') == 'device' else feeding.HostFeed)(
      images, labels, mesh)
  order = (i for epoch in itertools.count()
           for i in input_pipeline.batch_indices(len(labels), args['batch'], 0, epoch))
  holder = [feeding.replicate(state, mesh)]

  def step():
    holder[0], _ = train_step(holder[0], feed(next(order)), hp)  # the state is donated
  return step, lambda: jax.block_until_ready(holder[0]), jax_info(config)


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


def _keras_step(args: dict) -> tuple:
  """As the reference trained: train_on_batch on in-memory tensors, jit_compile=False."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images, labels = random_images(args['batch'] * POOL_BATCHES, args['size'])
  x, y = tf.constant(images.astype('float32') / 255.0), tf.constant(labels)
  model, order = keras_model(args['size']), itertools.cycle(range(POOL_BATCHES))

  def step():  # train_on_batch returns numpy scalars: the step has finished
    i = next(order) * args['batch']
    model.train_on_batch(x[i:i + args['batch']], y[i:i + args['batch']])
  return step, lambda: None, {'keras': keras.__version__}


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
      'adam': 'fused' if cuda else 'foreach', 'memory_format': 'channels_last',
  }


def _torch_step(args: dict) -> tuple:
  """Channels-last, eager or torch.compile(backend=args['compile']), float32 or bfloat16
  autocast; each batch gathered from a uint8 set on the device, its indices drawn there: a copy
  from pageable host memory would wait for the previous step, and the host could no longer run
  ahead of a GPU."""
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  net = torch_model(args['size']).to(device).train()
  opt = torch.optim.Adam(net.parameters(), lr=LR, fused=device == 'cuda')
  net = torch.compile(net, backend=args['compile']) if args.get('compile') else net
  images, labels = random_images(args['batch'] * POOL_BATCHES, args['size'])
  x_all = torch.from_numpy(images).to(device)  # NHWC: a batch's permute is channels-last
  y_all = torch.from_numpy(labels).long().to(device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    i = torch.randperm(len(labels), device=device)[:args['batch']].sort().values
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.get('dtype') == 'bfloat16'):
      loss = loss_fn(net(x_all[i].permute(0, 3, 1, 2).float().div_(255.0)), y_all[i])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  return step, sync, {**torch_info(torch, device), 'compile_backend': args.get('compile')}


# Each builds (step, sync, info): step() dispatches one training step on a batch drawn from
# POOL_BATCHES batches of random images, sync() waits for the steps dispatched, info describes
# the framework and device.
STEPS = {**dict.fromkeys(OURS, _ours_step), 'keras': _keras_step, 'torch': _torch_step}


def step_worker(args: dict, pipe) -> None:
  """Builds one framework's train step (STEPS) and reports its first call, with compilation,
  and the mean of args['warmup_steps'] more; then, per request of n, times n steps dispatched in
  a row and awaited once (wall and CPU seconds a step), until the parent has no more."""
  step, sync, info = STEPS[args['framework']](args)
  t = time.perf_counter()
  step()
  sync()
  first_s, t = time.perf_counter() - t, time.perf_counter()
  warmup = max(1, args.get('warmup_steps', 1))  # lazy set-up after the first step is not timed
  for _ in range(warmup):
    step()
  sync()
  pipe.emit({**info, 'first_step_s': first_s, 'warm_step_s': (time.perf_counter() - t) / warmup})
  while (n := pipe.request()) is not None:
    c, t = time.process_time(), time.perf_counter()
    for _ in range(n):
      step()
    sync()
    pipe.emit({'wall_s': (time.perf_counter() - t) / n, 'cpu_s': (time.process_time() - c) / n})


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


def ours_pipeline(args: dict, pipe, repeats: int = 3) -> None:
  """load_dataset cold (decode + cache, median of `repeats` fresh caches) and warm, then three
  epochs of batches placed on the devices, as training feeds them."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import feeding  # pylint: disable=g-import-not-at-top
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  config = ours_config(image_size=args['size'], data_dir=args['data_dir'])

  def load(cache_dir: str):
    config.cache_dir, t = cache_dir, time.perf_counter()
    return input_pipeline.load_dataset(config), time.perf_counter() - t

  cold = statistics.median(load(os.path.join(args['cache_dir'], str(i)))[1]
                           for i in range(repeats))
  data, warm = load(config.cache_dir)  # the cache is built now
  n_all = len(data.train_labels) + len(data.holdout_labels) + len(data.test_labels)
  feed = feeding.HostFeed(data.train_images, data.train_labels, feeding.make_mesh())
  n, t = 0, time.perf_counter()
  for epoch in range(3):
    for idx in input_pipeline.batch_indices(len(data.train_labels), args['batch'], 0, epoch):
      jax.block_until_ready(feed(idx))
      n += len(idx)
  batches_s = time.perf_counter() - t
  pipe.emit({'images': n_all, 'cold_load_s': cold, 'warm_load_s': warm,
             'cold_images_per_s': n_all / cold, 'cached_images_per_s': n / batches_s})


def keras_pipeline(args: dict, pipe, epochs: int = 7) -> None:
  """The reference loader, decoding every file every epoch: the median of epochs 2 on.

  Its epochs are bimodal on 2 cores, hence six of them and the fastest beside the median.
  """
  import keras  # pylint: disable=g-import-not-at-top
  ds = keras.utils.image_dataset_from_directory(
      os.path.join(args['data_dir'], 'train'), image_size=(args['size'], args['size']),
      batch_size=args['batch'], verbose=False, follow_links=True)
  per_epoch = []
  for _ in range(epochs):
    n, t = 0, time.perf_counter()
    for x, _ in ds:
      n += int(x.shape[0])
    per_epoch.append(n / (time.perf_counter() - t))
  pipe.emit({'images': n, 'images_per_s': statistics.median(per_epoch[1:]),
             'fastest_images_per_s': max(per_epoch), 'epoch_images_per_s': per_epoch})


def _random_dataset(n_train: int, n_holdout: int, size: int):
  """An input_pipeline.Dataset of random images in memory (no files, no cache)."""
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  train, holdout = random_images(n_train, size, seed=1), random_images(n_holdout, size, seed=2)
  return input_pipeline.Dataset(*train, *holdout, *random_images(0, size), test_paths=[],
                                class_names=[f'class{i}' for i in range(CLASSES)], skipped=[])


def _later_epochs(ends: list[tuple[float, dict]]) -> dict:
  """The epochs after the first (which compiles), each to the end of its validation."""
  later = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
  return {'later_epochs_s': later, 'median_later_epoch_s': statistics.median(later or [0.0])}


def ours_e2e(args: dict, pipe) -> None:
  """args['epochs'] epochs of cnn.runs.train_and_evaluate with augmentation, from an image
  folder (args['data_dir'], decoded into an empty cache) or from args['images'] random images
  in memory; each epoch's time is to the end of its validation, as Keras' on_epoch_end."""
  from cnn import runs  # pylint: disable=g-import-not-at-top
  config = ours_config(
      image_size=args['size'], batch_size=args['batch'], dtype=args.get('dtype', 'float32'),
      conv_impl=args.get('conv_impl', 'auto'), data_aug=True, num_epochs=args['epochs'],
      early_stopping_patience=0, wandb_mode='disabled', download=False,
      compilation_cache_dir='off', data_dir=args.get('data_dir', ''),
      cache_dir=args.get('cache_dir', ''))
  data = None
  if 'images' in args:
    data = _random_dataset(args['images'], args['holdout'], args['size'])
    config.eval_batch_size = min(config.eval_batch_size, args['holdout'])  # no padded batches
  ends = []
  on_epoch_end = lambda epoch, metrics: ends.append((time.perf_counter(), metrics)) or False
  with tempfile.TemporaryDirectory(prefix='bench_e2e_') as workdir:
    t0 = time.perf_counter()
    summary = runs.train_and_evaluate(config, workdir, epoch_callback=on_epoch_end, data=data)
    wall_s = time.perf_counter() - t0
  last = ends[-1][1]
  pipe.emit({'wall_s': wall_s, 'epochs': len(ends), 'final_val_acc': last['val_acc'],
             **_later_epochs(ends), 'epoch_time_s': last['epoch_time_s'],
             'images_per_s': last['images_per_second'],
             'first_epoch_time_s': ends[0][1]['epoch_time_s'], 'eval_time_s': last['eval_time_s'],
             'time_to_first_step_s': summary.get('time_to_first_step_s'),
             'data_on_device': summary.get('data_on_device'), **jax_info(config)})


def keras_e2e(args: dict, pipe) -> None:
  """The reference recipe: image_dataset_from_directory (10% validation split), augment, fit."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cnn import augment  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  kwargs = dict(image_size=(args['size'], args['size']), batch_size=args['batch'],
                validation_split=0.1, seed=0, verbose=False)
  train_dir = os.path.join(args['data_dir'], 'train')
  train_ds = keras.utils.image_dataset_from_directory(train_dir, subset='training', **kwargs)
  val_ds = keras.utils.image_dataset_from_directory(train_dir, subset='validation', **kwargs)
  r = augment.REFERENCE  # the reference's ImageDataGenerator ranges, as Keras 3 layers
  aug = keras.Sequential([
      keras.layers.RandomFlip('horizontal'),
      keras.layers.RandomRotation(r['rotation'] / 360, fill_mode='nearest'),
      keras.layers.RandomTranslation(r['shift'], r['shift'], fill_mode='nearest'),
      keras.layers.RandomZoom(r['zoom'], r['zoom'], fill_mode='nearest'),
      keras.layers.RandomBrightness(r['brightness'], value_range=(0, 1))])
  train_ds = train_ds.map(lambda x, y: (aug(x / 255.0, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
  ends = []
  timer = keras.callbacks.LambdaCallback(
      on_epoch_end=lambda epoch, logs: ends.append((time.perf_counter(), logs)))
  keras_model(args['size']).fit(train_ds, validation_data=val_ds.map(lambda x, y: (x / 255.0, y)),
                                epochs=args['epochs'], verbose=0, callbacks=[timer])
  pipe.emit({'wall_s': time.perf_counter() - t0, 'epochs': len(ends), **_later_epochs(ends),
             'final_val_acc': float(ends[-1][1].get('val_accuracy', float('nan')))})


MEASURES = {f.__name__: f for f in (step_worker, ours_pipeline, keras_pipeline, ours_e2e,
                                    keras_e2e)}
