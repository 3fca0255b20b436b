"""TrainState, the jitted steps, and `train_and_evaluate(config, workdir)`.

What changes the compiled program (the architecture, the optimizer kind, augmentation on or
off, flip averaging) is a `Program`; `steps_for(program)` jits its steps once per process and
every run that shares it reuses them, so an offline sweep over learning rates compiles once.
Everything else a run varies (learning rate and its schedule, weight decay, label smoothing,
augmentation ranges) is a traced hyperparameter. A run is one flat loop over `state.step`;
epochs are `step // steps_per_epoch`.
"""

import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn import augment
from cnn import checkpoints
from cnn import config as config_lib
from cnn import download
from cnn import errors
from cnn import feeding
from cnn import input_pipeline
from cnn import metrics_writer
from cnn import models
from cnn import progress
from configs import default

EpochCallback = Callable[[int, dict[str, float]], bool]
TrainingDiverged = errors.TrainingDiverged


class TrainState(flax.struct.PyTreeNode):
  """All that training changes; a pytree without static fields (the checkpoint's `state`)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; step t uses fold_in(rng, t), so resuming repeats the run
  ema_params: Any = None  # the weights' moving average (config.ema_epochs); None when off

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}

  @property
  def validated_params(self) -> Any:
    """The weights that validation scores and the best checkpoint keeps."""
    return self.params if self.ema_params is None else self.ema_params


class Preempted(SystemExit):
  """SIGTERM/SIGINT arrived; the state at the current step was saved."""


@dataclasses.dataclass(frozen=True)
class Program:
  """What the compiled steps depend on; runs with equal Programs share one compilation."""
  model: models.CNN
  optimizer: str
  momentum: float  # sgd and rmsprop only (0 otherwise, so it does not split the cache)
  data_aug: bool
  tta_flip: bool
  ema: bool = False  # the step also updates state.ema_params (its decay is traced)
  erase: bool = False  # augmentation includes random erasing (its probability is traced)


def program_for(config: ml_collections.ConfigDict, num_classes: int) -> Program:
  momentum = float(config.momentum) if config.optimizer in ('sgd', 'rmsprop') else 0.0
  return Program(models.create_model(config, num_classes), config.optimizer, momentum,
                 bool(config.data_aug), bool(config.tta_flip), bool(config.ema_epochs),
                 bool(config.get('aug_erase', 0.0)))


def _unit_optimizer(name: str, momentum: float) -> optax.GradientTransformation:
  """`name` at learning rate 1 without weight decay; the step applies the traced schedule.

  Its state has the structure of optax's optimizer at any learning rate and weight decay, so
  checkpoints written when the step used `optax.adam(lr)` itself restore into it.
  """
  return {
      'adam': lambda: optax.adam(1.0),
      'adamw': lambda: optax.adamw(1.0, weight_decay=0.0),
      'nadam': lambda: optax.nadam(1.0),
      'sgd': lambda: optax.sgd(1.0, momentum=momentum),
      'rmsprop': lambda: optax.rmsprop(1.0, momentum=momentum),
  }[name]()


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return _unit_optimizer(config.optimizer, config.momentum)


def hyperparams(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
  """The traced hyperparameters of the train step, as float32 scalars."""
  hp = {
      'learning_rate': config.learning_rate,
      'warmup_steps': round(config.warmup_epochs * steps_per_epoch),
      'decay_steps': config.num_epochs * steps_per_epoch if config.lr_schedule == 'cosine' else 0,
      'weight_decay': config.weight_decay if config.optimizer == 'adamw' else 0.0,
      'label_smoothing': config.label_smoothing,
      'aug': augment.ranges_from_config(config),
      # Per step, so the average spans ema_epochs whatever the dataset's size.
      'ema_decay': max(0.0, 1 - 1 / (config.ema_epochs * steps_per_epoch))
                   if config.ema_epochs else 0.0,
  }
  return jax.tree_util.tree_map(np.float32, hp)


def learning_rate(hp: dict, step: jax.Array) -> jax.Array:
  """Linear warm-up over warmup_steps, then constant, or cosine to 0 at decay_steps."""
  t = step.astype(jnp.float32)
  warmup = hp['warmup_steps']
  warm = jnp.where(warmup > 0, jnp.minimum(1.0, (t + 1) / jnp.maximum(warmup, 1.0)), 1.0)
  done = jnp.clip((t - warmup) / jnp.maximum(hp['decay_steps'] - warmup, 1.0), 0.0, 1.0)
  decay = jnp.where(hp['decay_steps'] > 0, 0.5 * (1 + jnp.cos(jnp.pi * done)), 1.0)
  return hp['learning_rate'] * warm * decay


def ema_update(hp: dict, step: jax.Array, ema: Any, params: Any) -> Any:
  """The average after step `step` (0-based) of all weights so far, step s weighted by
  decay**(step - s) and normalised, so it is the weights themselves after the first step
  rather than a pull towards the random initialisation (Adam's bias correction)."""
  d = hp['ema_decay']
  w = (1 - d) / (1 - d ** (step.astype(jnp.float32) + 1))
  return jax.tree_util.tree_map(lambda e, p: e + w * (p - e), ema, params)


def create_train_state(config: ml_collections.ConfigDict, num_classes: int,
                       rng: jax.Array) -> TrainState:
  """Fresh parameters, batch statistics and optimizer state for `config`."""
  model = models.create_model(config, num_classes)
  init_rng, state_rng = jax.random.split(rng)
  variables = models.init_variables(model, config.image_size, init_rng)
  params = variables['params']
  # A copy: the train step donates the state, and one buffer cannot be donated twice.
  ema = jax.tree_util.tree_map(jnp.copy, params) if config.ema_epochs else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=make_optimizer(config).init(params), rng=state_rng, ema_params=ema)


# ---------------------------------------------------------------------------- the steps


def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0  # (B, H, W, 3) uint8 -> [0, 1]


def _loss_fn(program: Program, state: TrainState, batch: dict, hp: dict, images: jax.Array):
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
  smoothed = optax.smooth_labels(jax.nn.one_hot(batch['label'], program.model.num_classes),
                                 hp['label_smoothing'])

  def loss(params):
    logits, updates = program.model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    return optax.softmax_cross_entropy(logits, smoothed).mean(), (logits, updates)

  return loss


def _train_step(program: Program, tx: optax.GradientTransformation, state: TrainState,
                batch: dict, hp: dict) -> tuple[TrainState, dict]:
  images = _to_float(batch['image'])
  if program.data_aug:
    aug_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 2)
    images = augment.augment(aug_key, images, hp['aug'], erase=program.erase)
  # The barrier keeps XLA from fusing the input's conversion and the warp's gathers into the
  # convolutions, which then recompute them many times (a 96 px step: 1.05 s -> 0.7 s).
  images = jax.lax.optimization_barrier(images)
  loss_fn = _loss_fn(program, state, batch, hp, images)
  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  direction, opt_state = tx.update(grads, state.opt_state, state.params)
  lr, decay = learning_rate(hp, state.step), hp['weight_decay']
  new_params = jax.tree_util.tree_map(lambda p, d: p + lr * (d - decay * p), state.params,
                                      direction)
  new_state = state.replace(step=state.step + 1, params=new_params,
                            batch_stats=updates.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  if program.ema:
    new_state = new_state.replace(
        ema_params=ema_update(hp, state.step, state.ema_params, new_params))
  # A finite loss can still give non-finite parameters (an overflowing update); they must never
  # reach a checkpoint, so they count as divergence at this step too.
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(new_params)]))
  n = batch['label'].shape[0]
  metrics = {'loss_sum': loss * n,
             'correct': jnp.sum(jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32),
             'count': jnp.float32(n), 'finite': finite, 'step': state.step}
  return new_state, metrics


def _eval_step(program: Program, variables: dict, batch: dict) -> dict:
  """Sums of loss, correct predictions and count over the unmasked examples of a batch."""
  log_p = models.log_probabilities(program.model, variables, _to_float(batch['image']),
                                   program.tta_flip)
  loss = -jnp.take_along_axis(log_p, batch['label'][:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(log_p, -1) == batch['label']).astype(jnp.float32)
  mask = batch['mask']
  return {'loss_sum': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def _batch_stats_step(program: Program, variables: dict, images: jax.Array) -> Any:
  """These images' own batch-norm statistics: a clone at momentum 0 keeps only the batch's."""
  model = program.model.clone(bn_momentum=0.0, dropout=0.0)
  _, updates = model.apply(variables, _to_float(images), train=True, mutable=['batch_stats'])
  return updates['batch_stats']


def _train_mode_correct(program: Program, variables: dict, batch: dict) -> jax.Array:
  """Correct predictions with batch statistics and dropout off (the bn_gap diagnostic)."""
  model = program.model.clone(dropout=0.0)
  logits, _ = model.apply(variables, _to_float(batch['image']), train=True,
                          mutable=['batch_stats'])
  return jnp.sum(jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)


class Steps(NamedTuple):
  train: Callable  # (state, batch, hyperparams) -> (state, metrics); the state is donated
  evaluate: Callable  # (variables, batch with mask) -> sums of loss, correct, count
  batch_stats: Callable  # (variables, images) -> the images' own batch statistics
  train_mode_correct: Callable  # (variables, batch) -> correct count in train mode


@functools.cache
def steps_for(program: Program) -> Steps:
  """The jitted steps of `program`, built once per process and shared by all its runs."""
  tx = _unit_optimizer(program.optimizer, program.momentum)
  # The old state's buffers are reused for the new one: no second copy of params and moments.
  return Steps(
      train=jax.jit(functools.partial(_train_step, program, tx), donate_argnums=0),
      evaluate=jax.jit(functools.partial(_eval_step, program)),
      batch_stats=jax.jit(functools.partial(_batch_stats_step, program)),
      train_mode_correct=jax.jit(functools.partial(_train_mode_correct, program)))


# ---------------------------------------------------------------------------- validation


def _sum_in_turn(per_batch: Callable[[dict], Any], batches: Iterator[dict], mesh: Mesh) -> Any:
  """The sum over `batches` of the pytree per_batch(batch split over `mesh`), one batch's
  programs in flight at a time.

  The batches do not depend on each other, so unawaited their programs pile up: dozens of small
  ones (one per array of the sum). On a CPU split into devices (tests/test_parallel.py, 2 cores)
  that deadlocked one 2-device run in twelve: one of XLA's two threads waited inside precise
  BN's all-reduce for the other device, while the other thread, which had to run it, waited on a
  launch semaphore. Each batch's compute dwarfs the host's work between batches, so waiting
  costs validation nothing.
  """
  total = None
  for batch in batches:
    m = per_batch(feeding.shard_batch(batch, mesh))
    total = jax.block_until_ready(
        m if total is None else jax.tree_util.tree_map(jnp.add, total, m))
  return total


def evaluate_arrays(steps: Steps, variables: dict, arrays: tuple[np.ndarray, np.ndarray],
                    batch_size: int, mesh: Mesh) -> tuple[float, float]:
  """(mean loss, accuracy) in eval mode on all of `arrays` = (images, labels)."""
  totals = _sum_in_turn(functools.partial(steps.evaluate, variables),
                        input_pipeline.eval_batches(*arrays, batch_size), mesh)
  count = float(totals['count'])
  return float(totals['loss_sum']) / count, float(totals['correct']) / count


def fixed_sample(labels: np.ndarray, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of min(n, all) images rounded down to whole batches, in a `seed`ed random order.

  Not sorted: the arrays are ordered by class, and batches of one class have batch statistics
  that training never saw (their variance lacks the spread between classes).
  """
  k = max(1, min(n, len(labels)) // batch_size) * batch_size
  return np.random.default_rng(seed).permutation(len(labels))[:k]


def precise_batch_stats(steps: Steps, variables: dict, images: np.ndarray, batch_size: int,
                        mesh: Mesh) -> Any:
  """Batch-norm statistics of `variables` averaged over `images` in training-size batches
  ("precise BN").

  The running averages at momentum 0.99 lag the weights by ~100 steps, more than an epoch of a
  small dataset, and belong to the weights, not to their moving average; the average of these
  weights' own batch statistics does neither.
  """
  n = len(images) // batch_size
  batches = ({'image': images[i * batch_size:(i + 1) * batch_size]} for i in range(n))
  total = _sum_in_turn(lambda b: steps.batch_stats(variables, b['image']), batches, mesh)
  return jax.tree_util.tree_map(lambda x: x / n, total)


def bn_gap(steps: Steps, variables: dict, arrays: tuple[np.ndarray, np.ndarray],
           batch_size: int, mesh: Mesh) -> dict[str, float]:
  """Accuracy with batch statistics vs in eval mode on the same un-augmented images."""
  images, labels = arrays
  correct = 0.0
  for i in range(len(labels) // batch_size):
    batch = {'image': images[i * batch_size:(i + 1) * batch_size],
             'label': labels[i * batch_size:(i + 1) * batch_size]}
    correct += float(steps.train_mode_correct(variables, feeding.shard_batch(batch, mesh)))
  _, eval_acc = evaluate_arrays(steps, variables, arrays, batch_size, mesh)
  train_acc = correct / len(labels)
  return {'bn_gap_train_mode_acc': train_acc, 'bn_gap_eval_mode_acc': eval_acc,
          'bn_gap': train_acc - eval_acc}


# ---------------------------------------------------------------------------- stopping


@dataclasses.dataclass
class EarlyStopping:
  """Which epoch is best and when to stop; its fields are saved in every checkpoint.

  With smoothing a, epochs are compared by s_e = a * s_(e-1) + (1 - a) * val_acc_e: one lucky
  epoch on a small hold-out neither wins the checkpoint nor resets the patience on its own.
  """
  best_val_acc: float = -1.0  # raw val accuracy of the chosen epoch
  best_score: float = -1.0  # the (smoothed) value that chose it
  best_epoch: int = 0
  bad_epochs: int = 0
  smoothed_val_acc: float | None = None
  stopped_early_by: str | None = None  # 'patience', 'callback' or 'wandb_agent'

  @classmethod
  def from_meta(cls, meta: dict) -> 'EarlyStopping':
    """From a checkpoint's meta, also one written before smoothing existed."""
    fields = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in meta.items() if k in fields}
    known.setdefault('best_score', known.get('best_val_acc', -1.0))
    return cls(**known)

  def update(self, epoch: int, val_acc: float, config: ml_collections.ConfigDict) -> bool:
    """Takes epoch `epoch`'s val accuracy; True when it is the new best."""
    a = config.early_stopping_smoothing
    prev = self.smoothed_val_acc
    self.smoothed_val_acc = val_acc if prev is None else a * prev + (1 - a) * val_acc
    improved = self.smoothed_val_acc > self.best_score
    if improved:
      self.best_val_acc, self.best_score, self.best_epoch = val_acc, self.smoothed_val_acc, epoch
      self.bad_epochs = 0
    else:
      self.bad_epochs += 1
    patience = config.early_stopping_patience
    if patience and self.bad_epochs >= patience and epoch >= config.early_stopping_min_epochs:
      self.stopped_early_by = 'patience'
    return improved


# ---------------------------------------------------------------------------- the loop


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class Run:
  """The explicit inputs of one training run: the loop reads nothing else."""
  config: ml_collections.ConfigDict
  data: input_pipeline.Dataset
  steps: Steps
  mesh: Mesh
  workdir: str
  writer: metrics_writer.MetricsWriter
  epoch_callback: EpochCallback | None = None
  on_first_step: Callable[[Any], None] | None = None

  @property
  def steps_per_epoch(self) -> int:
    return len(self.data.train_labels) // self.config.batch_size

  @functools.cached_property
  def hp(self) -> dict:
    return hyperparams(self.config, self.steps_per_epoch)

  @functools.cached_property
  def feed(self) -> feeding.HostFeed | feeding.DeviceFeed:
    feed = feeding.make_feed(self.config, self.data.train_images, self.data.train_labels,
                             self.mesh)
    if feed.on_device:
      print(f'training images on the device(s): {self.data.train_images.nbytes / 2**20:.0f} MiB '
            '(--config.device_data=off keeps them on the host)')
    return feed

  @functools.cached_property
  def bn_images(self) -> np.ndarray:
    """The fixed training images precise BN averages over (seeded: the same on resume)."""
    idx = fixed_sample(self.data.train_labels, self.config.precise_bn_images,
                       self.config.batch_size, self.config.seed)
    return self.data.train_images[idx]

  @functools.cached_property
  def gap_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    idx = fixed_sample(self.data.train_labels, self.config.bn_gap_images,
                       self.config.batch_size, self.config.seed + 1)
    return self.data.train_images[idx], self.data.train_labels[idx]


@dataclasses.dataclass
class LoopState:
  """What a resumed run needs besides the TrainState: saved as the checkpoint's meta."""
  sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # loss_sum, correct, count of this epoch
  epoch_time_s: float = 0.0  # training time spent in this epoch so far
  stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)

  def to_meta(self) -> dict:
    return {'sums': list(self.sums), 'epoch_time_s': self.epoch_time_s,
            **dataclasses.asdict(self.stopping)}

  @classmethod
  def from_meta(cls, meta: dict) -> 'LoopState':
    return cls(tuple(meta['sums']), meta['epoch_time_s'], EarlyStopping.from_meta(meta))


class _EpochSums:
  """The epoch's training sums, added on the device: nothing in the loop waits for a step."""

  def __init__(self, sums: tuple[float, float, float], elapsed_s: float):
    self.sums = jnp.asarray(sums, jnp.float32)
    self.bad_step = jnp.int32(-1)
    self.t0 = time.time() - elapsed_s

  def add(self, m: dict) -> None:
    self.sums = self.sums + jnp.stack([m['loss_sum'], m['correct'], m['count']])
    self.bad_step = jnp.where((self.bad_step < 0) & ~m['finite'], m['step'], self.bad_step)

  def check_finite(self, epoch: int) -> None:
    if int(self.bad_step) >= 0:
      raise TrainingDiverged(f'the training loss or parameters became NaN/inf at step '
                             f'{int(self.bad_step)} (epoch {epoch}); {_DIVERGED_ADVICE}')

  def host(self) -> tuple[tuple[float, float, float], float]:
    return tuple(float(x) for x in self.sums), time.time() - self.t0

  def metrics(self) -> dict[str, float]:
    (loss_sum, correct, count), elapsed = self.host()
    return {'train_loss': loss_sum / count, 'train_acc': correct / count,
            'epoch_time_s': elapsed, 'images_per_second': count / elapsed}


_DIVERGED_ADVICE = ('checkpoints from before it are kept. Try a lower --config.learning_rate '
                    '(e.g. 3e-4) or --config.batch_norm=True')


def _batches_from(run: Run, step: int) -> Iterator[dict[str, jax.Array]]:
  """The training batches, on the devices, from global step `step` to the end of num_epochs."""
  first_epoch, start = divmod(step, run.steps_per_epoch)
  n, c = len(run.data.train_labels), run.config
  for epoch in range(first_epoch, c.num_epochs):
    for idx in input_pipeline.batch_indices(n, c.batch_size, c.seed, epoch,
                                            start if epoch == first_epoch else 0):
      yield run.feed(idx)


def _save_latest(run: Run, state: TrainState, loop: LoopState) -> None:
  checkpoints.save_latest(run.workdir, state, loop.to_meta())


def _save_mid_epoch(run: Run, state: TrainState, loop: LoopState, sums: _EpochSums) -> None:
  sums.check_finite((int(state.step) - 1) // run.steps_per_epoch + 1)  # the epoch of that step
  loop.sums, loop.epoch_time_s = sums.host()
  _save_latest(run, state, loop)


def train_loop(run: Run, state: TrainState, loop: LoopState) -> tuple[TrainState, str | None]:
  """Trains from state.step to the end of num_epochs or an early stop.

  Returns the state and the signal ('SIGTERM', 'SIGINT') that stopped it, if one did; the state
  at that step is saved then.
  """
  spe, every = run.steps_per_epoch, run.config.checkpoint_every_steps
  step = int(state.step)
  sums = _EpochSums(loop.sums, loop.epoch_time_s)
  bar = progress.EpochBar(spe, run.config.batch_size, run.config.num_epochs)
  bar.start(step // spe + 1, step % spe)
  if step % spe == 0 and loop.sums[2]:  # stopped after an epoch's last step, before validation
    state, sums = _finish_epoch(run, state, loop, sums, bar)
  with _StopSignal() as stop:
    for batch in _batches_from(run, step):
      if loop.stopping.stopped_early_by:
        break
      state, m = run.steps.train(state, batch, run.hp)
      step += 1
      bar.update(step % spe or spe, sums.sums)  # the previous step's sums: read a step late
      sums.add(m)
      if run.on_first_step is not None:
        run.on_first_step(jax.block_until_ready(state.step))
        run.on_first_step = None
      if stop.received or (every and step % every == 0):
        _save_mid_epoch(run, state, loop, sums)
        if stop.received:
          bar.end()
          return state, stop.received
      if step % spe == 0:
        state, sums = _finish_epoch(run, state, loop, sums, bar)
  return state, None


def _finish_epoch(run: Run, state: TrainState, loop: LoopState, sums: _EpochSums,
                  bar: progress.EpochBar) -> tuple[TrainState, _EpochSums]:
  bar.end()
  state = _end_of_epoch(run, state, loop, sums)
  bar.start(int(state.step) // run.steps_per_epoch + 1, 0)
  return state, _EpochSums((0.0, 0.0, 0.0), 0.0)


def _validated_variables(run: Run, state: TrainState) -> tuple[TrainState, dict]:
  """(state, the eval-mode variables validation scores): the weights or their EMA, with batch
  statistics from precise BN (bn_stats='precise') or the running averages.

  Without an EMA the state takes the precise statistics too, as it always has: they are what
  its latest checkpoint holds.
  """
  c = run.config
  variables = {'params': state.validated_params, 'batch_stats': state.batch_stats}
  if c.bn_stats == 'precise' and state.batch_stats:
    variables['batch_stats'] = precise_batch_stats(run.steps, variables, run.bn_images,
                                                   c.batch_size, run.mesh)
    if state.ema_params is None:
      state = state.replace(batch_stats=variables['batch_stats'])
  return state, variables


def _end_of_epoch(run: Run, state: TrainState, loop: LoopState, sums: _EpochSums) -> TrainState:
  """Validates, logs, checkpoints and decides on early stopping after a finished epoch."""
  epoch, c = int(state.step) // run.steps_per_epoch, run.config
  sums.check_finite(epoch)
  train_metrics = sums.metrics()
  t0 = time.time()
  state, variables = _validated_variables(run, state)
  if c.bn_gap_images:  # of the eval-mode model that is validated next
    train_metrics.update(bn_gap(run.steps, variables, run.gap_arrays, c.batch_size, run.mesh))
  val_loss, val_acc = evaluate_arrays(run.steps, variables, (
      run.data.holdout_images, run.data.holdout_labels), c.eval_batch_size, run.mesh)
  if not np.isfinite(val_loss):  # finite parameters that are useless: not a checkpoint to keep
    raise TrainingDiverged(f'the validation loss became NaN/inf after step {int(state.step)} '
                           f'(end of epoch {epoch}); {_DIVERGED_ADVICE}')
  metrics = {**train_metrics, 'val_loss': val_loss, 'val_acc': val_acc, 'step': int(state.step),
             'eval_time_s': time.time() - t0}  # precise BN (and the bn_gap diagnostic) included
  if loop.stopping.update(epoch, val_acc, c):
    checkpoints.save_best(run.workdir, int(state.step), variables, {
        'epoch': epoch, 'val_acc': val_acc, 'class_names': run.data.class_names})
  if run.epoch_callback is not None and run.epoch_callback(epoch, metrics):
    loop.stopping.stopped_early_by = 'callback'
  loop.sums, loop.epoch_time_s = (0.0, 0.0, 0.0), 0.0
  _save_latest(run, state, loop)
  run.writer.write(epoch, metrics)
  return state


# ---------------------------------------------------------------------------- the run


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose run has another config, unless new_run moves that run aside."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  # Laid over the defaults: a field added since the old run had its default there.
  old = checkpoints.load_run_config(workdir, default.get_config())
  old_fields, fields = config_lib.run_fields(old), config_lib.run_fields(config)
  listed = config_lib.config_diff(old_fields, fields)
  if not listed:
    return
  if not config.new_run:  # e.g. a run of an older configs/tuned.py, whose num_epochs changed
    raise errors.WorkdirError(
        f'{workdir} holds a run with a different config ({listed}). Use another --workdir, '
        f'resume that run as it was with {config_lib.flags_to_restore(old_fields, fields)}, or '
        f'pass --config.new_run=True to keep that run under {workdir}/previous_runs/ and start '
        'anew')
  dest = os.path.join(workdir, 'previous_runs', time.strftime('%Y%m%d-%H%M%S'))
  os.makedirs(dest)
  for name in os.listdir(workdir):
    if name != 'previous_runs':
      shutil.move(os.path.join(workdir, name), dest)
  print(f'moved the previous run ({listed}) to {dest}')


def _completed_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The summary of a finished run of this very config in `workdir`, if there is one."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  summary = checkpoints.read_json(path)
  finished = summary.get('stopped_early_by') or summary.get('epochs_run', 0) >= config.num_epochs
  return summary if summary.get('status') == 'completed' and finished else None


def _read_history(workdir: str, epochs: int) -> list[dict]:
  """metrics.jsonl's first `epochs` epochs (later ones were logged after the checkpoint)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r['epoch'] <= epochs]


def _summary(run: Run, state: TrainState, loop: LoopState, timing: dict) -> dict:
  history = _read_history(run.workdir, int(state.step) // run.steps_per_epoch)
  steady = [h['images_per_second'] for h in history[1:]] or [
      h['images_per_second'] for h in history]
  s, data, n_val = loop.stopping, run.data, len(run.data.holdout_labels)
  return {
      'status': 'completed',
      'best_val_accuracy': s.best_val_acc,
      'best_epoch': s.best_epoch,
      # How far the chosen epoch's val can be trusted: the binomial standard error on the
      # hold-out; choosing the best of many epochs also flatters it (see the README).
      'best_val_accuracy_stderr': float(np.sqrt(max(s.best_val_acc, 0) *
                                                (1 - max(s.best_val_acc, 0)) / max(n_val, 1))),
      'model_selection': (f'val_acc EMA (smoothing {run.config.early_stopping_smoothing})'
                          if run.config.early_stopping_smoothing else 'val_acc'),
      'bn_stats': run.config.bn_stats,
      'validated_weights': (f'EMA over {run.config.ema_epochs:g} epochs'
                            if run.config.ema_epochs else 'the weights'),
      'epochs_run': len(history),
      'final_val_accuracy': history[-1]['val_acc'] if history else None,
      'stopped_early_by': s.stopped_early_by,
      'num_params': models.count_parameters(state.params),
      'num_batch_stats': models.count_parameters(state.batch_stats),
      # Median over epochs after the first, whose time includes compilation.
      'train_images_per_second': float(np.median(steady)) if steady else None,
      'class_names': data.class_names,
      'num_train_images': len(data.train_labels),
      'num_holdout_images': n_val,
      'num_test_images': len(data.test_labels),
      'skipped_images': data.skipped,
      'num_skipped_images': len(data.skipped),
      'num_devices': jax.device_count(),
      'data_on_device': run.feed.on_device,
      **timing,
  }


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """XLA's persistent cache, so a new process (`wandb agent` starts one a run) skips compiling."""
  if config.compilation_cache_dir == 'off' or jax.config.jax_compilation_cache_dir:
    return  # off, or already set (JAX_COMPILATION_CACHE_DIR, a test run, an earlier run)
  path = config.compilation_cache_dir or str(input_pipeline.user_cache_root() / 'jax')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _prepare(config: ml_collections.ConfigDict,
             data: input_pipeline.Dataset | None) -> tuple[ml_collections.ConfigDict, Any]:
  """The dataset and the config with device-dependent sizes resolved; errors before any work."""
  if data is None:
    download.ensure_dataset(config)
    data = input_pipeline.load_dataset(config)
  if config.batch_size % jax.device_count():
    raise config_lib.ConfigError(f'batch_size={config.batch_size} must be a multiple of the '
                                 f'{jax.device_count()} devices')
  if len(data.train_labels) < config.batch_size:
    raise config_lib.ConfigError(f'only {len(data.train_labels)} training images for '
                                 f'batch_size={config.batch_size}; lower --config.batch_size')
  config = config.copy_and_resolve_references()
  config.eval_batch_size = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()
  return config, data


def _restore(run: Run, num_classes: int) -> tuple[TrainState, LoopState]:
  """The workdir's latest checkpoint, or a fresh state; metrics.jsonl cut to match it."""
  state = feeding.replicate(create_train_state(run.config, num_classes,
                                       jax.random.PRNGKey(run.config.seed)), run.mesh)
  loop = LoopState()
  restored = checkpoints.restore_latest(run.workdir, state)
  if restored is not None:
    state, loop = restored[0], LoopState.from_meta(restored[1])
    epoch, batch = divmod(int(state.step), run.steps_per_epoch)
    print(f'resuming {run.workdir} at step {int(state.step)} (epoch {epoch + 1}, batch {batch})')
  history = _read_history(run.workdir, int(state.step) // run.steps_per_epoch)
  with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(h) + '\n' for h in history)
  return state, loop


def _first_step_timer(t_start: float, timing: dict) -> Callable[[Any], None]:
  def first_step(_):
    timing['time_to_first_step_s'] = time.time() - t_start
    print(f'first step done {timing["time_to_first_step_s"]:.1f} s after start '
          f'(data {timing["data_load_s"]:.1f} s)', flush=True)
  return first_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       epoch_callback: EpochCallback | None = None,
                       data: input_pipeline.Dataset | None = None) -> dict:
  """Trains (or resumes, or finds finished) the run in `workdir`; returns its summary.

  `epoch_callback(epoch, metrics)` runs after each epoch's validation; True stops the run
  (hyperband early termination in sweeps). `data` skips reading `config.data_dir`.
  """
  t_start = time.time()
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir(config, workdir)
  done = _completed_summary(config, workdir)
  if done is not None:
    print(f'{workdir}: run already complete (best val_acc {done["best_val_accuracy"]:.4f} at epoch '
          f'{done["best_epoch"]}); nothing to do. Use another --workdir to train again.')
    return done
  config, data = _prepare(config, data)
  enable_compilation_cache(config)
  timing = {'data_load_s': time.time() - t_start}
  steps = steps_for(program_for(config, len(data.class_names)))
  run = Run(config, data, steps, feeding.make_mesh(), workdir,
            metrics_writer.MetricsWriter(config, workdir), epoch_callback,
            _first_step_timer(t_start, timing))
  try:
    state, loop = _restore(run, len(data.class_names))
    checkpoints.save_run_config(workdir, config)
    if not loop.stopping.stopped_early_by:
      state = _train_unless_agent_stops(run, state, loop)
    timing['wall_time_s'] = time.time() - t_start
    summary = _summary(run, state, loop, timing)
    checkpoints.write_json(os.path.join(workdir, 'summary.json'), summary)
    run.writer.write_summary(summary)
  finally:
    run.writer.close()
  print(f'best val_acc {summary["best_val_accuracy"]:.4f} at epoch {summary["best_epoch"]} '
        f'of {summary["epochs_run"]}; results in {workdir}')
  return summary


def _train_unless_agent_stops(run: Run, state: TrainState, loop: LoopState) -> TrainState:
  """A signal ends the process with Preempted, but under `wandb agent` SIGTERM is W&B's early
  termination: a finished run, not a crash."""
  state, signal_name = train_loop(run, state, loop)
  if signal_name is None:
    return state
  if not os.environ.get('WANDB_SWEEP_ID'):
    epoch, batch = divmod(int(state.step), run.steps_per_epoch)
    raise Preempted(f'{signal_name}: saved a checkpoint at step {int(state.step)} (epoch '
                    f'{epoch + 1}, batch {batch}); run the same command again to resume')
  loop.stopping.stopped_early_by = 'wandb_agent'
  return state


def run_train(config: ml_collections.ConfigDict, workdir: str, args: list[str]) -> int:
  """--mode=train."""
  if args:
    raise config_lib.ConfigError(f'--mode=train takes no positional arguments, got {args}')
  train_and_evaluate(config, workdir)
  return 0
