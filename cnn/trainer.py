"""The research core: TrainState, the pure jitted steps, the optimizer and its schedule, precise
batch norm, the weights' EMA, validation and the loop over batches.

It knows nothing of folders, processes or loggers: `cnn/runs.py` drives `train_loop` through two
hooks, one after every step and one at every epoch's end. The steps are jitted once per
architecture: what a run varies besides it (learning rate, schedule, weight decay, label
smoothing, augmentation ranges, EMA decay) is traced, so a sweep over them compiles once.
"""

import functools
import inspect
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn import augment
from cnn import errors
from cnn import feeding
from cnn import models


class TrainState(flax.struct.PyTreeNode):
  """All that training changes, with the module and optimizer that change it (static fields).

  flax's `train_state.TrainState`, holding the module rather than its `apply` (validation clones
  it), plus batch statistics, the run's key and the weights' moving average.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key; step t uses fold_in(rng, t), so resuming repeats the run
  model: models.CNN = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_params: Any = None  # the weights' moving average (config.ema_epochs); None when off

  def apply_gradients(self, grads: Any, learning_rate: jax.Array, **changes) -> 'TrainState':
    """One optimizer step at `learning_rate`, written into the injected hyperparameters."""
    hyper = {**self.opt_state.hyperparams, 'learning_rate': learning_rate}
    opt_state = self.opt_state._replace(hyperparams=hyper)
    updates, opt_state = self.tx.update(grads, opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)

  @property
  def validated_params(self) -> Any:
    """The weights that validation scores and the best checkpoint keeps."""
    return self.params if self.ema_params is None else self.ema_params


OPTIMIZERS = {'adam': optax.adam, 'adamw': optax.adamw, 'nadam': optax.nadam, 'sgd': optax.sgd,
              'rmsprop': optax.rmsprop}


@functools.cache
def optimizer(kind: str, momentum: float | None = None,
              nesterov: bool = False) -> optax.GradientTransformation:
  """optax's `kind` with its learning rate (and weight decay) as state, one object per kind.

  Only those two are injected: the others stay Python constants, as in optax's own optimizer
  (a traced b1 would round 1 - b1 differently). Runs that differ in learning rate or weight decay
  then share one compiled step.
  """
  factory = OPTIMIZERS[kind]
  params = inspect.signature(factory).parameters
  static = [n for n in params if n not in ('learning_rate', 'weight_decay')]
  kwargs = {'momentum': momentum, 'nesterov': nesterov} if kind in ('sgd', 'rmsprop') else {}
  return optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.0, **kwargs)


def create_train_state(config: ml_collections.ConfigDict, num_classes: int,
                       rng: jax.Array) -> TrainState:
  """Fresh parameters, batch statistics and optimizer state for `config`."""
  model = models.create_model(config, num_classes)
  init_rng, state_rng = jax.random.split(rng)
  variables = models.init_variables(model, config.image_size, init_rng)
  params = variables['params']
  momentum = config.momentum if config.optimizer in ('sgd', 'rmsprop') else None
  tx = optimizer(config.optimizer, momentum, config.nesterov)
  opt_state = tx.init(params)
  if 'weight_decay' in opt_state.hyperparams:
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams,
                                                'weight_decay': jnp.float32(config.weight_decay)})
  # A copy: the train step donates the state, and one buffer cannot be donated twice.
  ema = jax.tree_util.tree_map(jnp.copy, params) if config.ema_epochs else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=opt_state,
                    rng=state_rng, model=model, tx=tx, ema_params=ema)


def hyperparams(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
  """The train step's traced hyperparameters, as float32 scalars."""
  hp = {
      'learning_rate': config.learning_rate,
      'warmup_steps': round(config.warmup_epochs * steps_per_epoch),
      'decay_steps': config.num_epochs * steps_per_epoch if config.lr_schedule == 'cosine' else 0,
      'label_smoothing': config.label_smoothing,
      'aug': augment.ranges_from_config(config),
      # Per step, so the average spans ema_epochs whatever the dataset's size.
      'ema_decay': max(0.0, 1 - 1 / (config.ema_epochs * steps_per_epoch))
                   if config.ema_epochs else 0.0,
  }
  return jax.tree_util.tree_map(np.float32, hp)


def learning_rate(hp: dict, step: jax.Array) -> jax.Array:
  """Linear warm-up over warmup_steps, then constant, or cosine to 0 at decay_steps.

  Written out rather than built from optax's schedules: those branch in Python on their step
  counts, so every run length or schedule kind would compile a train step of its own.
  """
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


# ---------------------------------------------------------------------------- the steps


def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0  # (B, H, W, 3) uint8 -> [0, 1]


def _key(state: TrainState, stream: int) -> jax.Array:
  """Step `state.step`'s key of one random stream: 1 dropout, 2 augmentation."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), stream)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=('data_aug', 'erase'))
def train_step(state: TrainState, batch: dict, hp: dict, data_aug: bool = False,
               erase: bool = False) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`; the state is donated. `erase` adds random erasing."""
  images = _to_float(batch['image'])
  if data_aug:
    images = augment.augment(_key(state, 2), images, hp['aug'], erase=erase)
  # The barrier keeps XLA from fusing the input's conversion and the warp's gathers into the
  # convolutions, which then recompute them many times.
  images = jax.lax.optimization_barrier(images)
  targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], state.model.num_classes),
                                hp['label_smoothing'])

  def loss_fn(params):
    logits, updates = state.model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': _key(state, 1)}, mutable=['batch_stats'])
    return optax.softmax_cross_entropy(logits, targets).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, learning_rate(hp, state.step),
                                    batch_stats=updates.get('batch_stats', state.batch_stats))
  if state.ema_params is not None:
    new_state = new_state.replace(
        ema_params=ema_update(hp, state.step, state.ema_params, new_state.params))
  # A finite loss can still give non-finite parameters (an overflowing update); they must never
  # reach a checkpoint, so they count as divergence at this step too.
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(new_state.params)]))
  n = batch['label'].shape[0]
  return new_state, {
      'sums': jnp.stack([loss * n, jnp.sum(jnp.argmax(logits, -1) == batch['label']),
                         jnp.float32(n)]).astype(jnp.float32),
      'finite': finite, 'step': state.step}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _log_probs_step(model: models.CNN, variables: dict, images: jax.Array,
                    tta_flip: bool) -> jax.Array:
  return models.log_probabilities(model, variables, _to_float(images), tta_flip)


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats_step(model: models.CNN, variables: dict, images: jax.Array) -> Any:
  """These images' own batch-norm statistics: a clone at momentum 0 keeps only the batch's."""
  model = model.clone(bn_momentum=0.0, dropout=0.0)
  _, updates = model.apply(variables, _to_float(images), train=True, mutable=['batch_stats'])
  return updates['batch_stats']


@functools.partial(jax.jit, static_argnums=0)
def _train_mode_correct(model: models.CNN, variables: dict, batch: dict) -> jax.Array:
  """Correct predictions with batch statistics and dropout off (the bn_gap diagnostic)."""
  logits, _ = model.clone(dropout=0.0).apply(variables, _to_float(batch['image']), train=True,
                                             mutable=['batch_stats'])
  return jnp.sum(jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)


# ---------------------------------------------------------------------------- validation


def _batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The whole batches of `arrays` in order; a remainder is left out."""
  n = len(next(iter(arrays.values()))) // batch_size
  for i in range(n):
    yield {k: v[i * batch_size:(i + 1) * batch_size] for k, v in arrays.items()}


def _sum_in_turn(per_batch: Callable[[dict], Any], batches: Iterable[dict], mesh: Mesh) -> Any:
  """The sum over `batches` of per_batch(batch split over `mesh`), one batch in flight at a time.

  Unawaited, the batches' many small programs pile up, and on a CPU split into devices XLA's
  threads can then deadlock between an all-reduce and a launch semaphore. A batch's compute
  dwarfs the host's work between batches, so waiting costs nothing.
  """
  total = None
  for batch in batches:
    m = per_batch(feeding.shard_batch(batch, mesh))
    total = jax.block_until_ready(
        m if total is None else jax.tree_util.tree_map(jnp.add, total, m))
  return total


def log_probabilities(model: models.CNN, variables: dict, images: np.ndarray, batch_size: int,
                      tta_flip: bool = False) -> np.ndarray:
  """(N, C) class log-probabilities of uint8 images (N, S, S, 3), split over all devices.

  Validation, evaluation and prediction all score through here. Batches are padded to one
  compiled shape; the result is gathered to every process.
  """
  mesh = feeding.make_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the devices
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padded = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
    log_p = _log_probs_step(model, variables, feeding.shard_batch({'x': padded}, mesh)['x'],
                            tta_flip)
    out.append(np.asarray(multihost_utils.process_allgather(log_p, tiled=True))[:len(batch)])
  return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def evaluate_arrays(model: models.CNN, variables: dict, arrays: tuple[np.ndarray, np.ndarray],
                    batch_size: int, tta_flip: bool = False) -> tuple[float, float]:
  """(mean loss, accuracy) in eval mode on all of `arrays` = (images, labels)."""
  images, labels = arrays
  log_p = log_probabilities(model, variables, images, batch_size, tta_flip)
  loss = -np.take_along_axis(log_p, labels[:, None].astype(np.int64), axis=-1)
  return float(loss.mean()), float(np.mean(np.argmax(log_p, -1) == labels))


def fixed_sample(labels: np.ndarray, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of min(n, all) images rounded down to whole batches, in a `seed`ed random order.

  Not sorted: the arrays are ordered by class, and batches of one class have batch statistics
  that training never saw (their variance lacks the spread between classes).
  """
  k = max(1, min(n, len(labels)) // batch_size) * batch_size
  return np.random.default_rng(seed).permutation(len(labels))[:k]


def precise_batch_stats(model: models.CNN, variables: dict, images: np.ndarray,
                        batch_size: int) -> Any:
  """Batch-norm statistics of `variables` averaged over `images` in training-size batches
  ("precise BN").

  The running averages at momentum 0.99 lag the weights by ~100 steps, more than an epoch of a
  small dataset, and belong to the weights, not to their moving average; the average of these
  weights' own batch statistics does neither.
  """
  n = len(images) // batch_size
  total = _sum_in_turn(lambda b: _batch_stats_step(model, variables, b['image']),
                       _batches({'image': images}, batch_size), feeding.make_mesh())
  return jax.tree_util.tree_map(lambda x: x / n, total)


def bn_gap(model: models.CNN, variables: dict, arrays: tuple[np.ndarray, np.ndarray],
           batch_size: int) -> dict[str, float]:
  """Accuracy with batch statistics vs in eval mode on the same un-augmented images."""
  images, labels = arrays
  correct = _sum_in_turn(functools.partial(_train_mode_correct, model, variables),
                         _batches({'image': images, 'label': labels}, batch_size),
                         feeding.make_mesh())
  _, eval_acc = evaluate_arrays(model, variables, arrays, batch_size)
  train_acc = float(correct) / len(labels)
  return {'bn_gap_train_mode_acc': train_acc, 'bn_gap_eval_mode_acc': eval_acc,
          'bn_gap': train_acc - eval_acc}


def validated_variables(state: TrainState, bn_images: np.ndarray | None,
                        batch_size: int) -> dict:
  """The eval-mode variables validation scores: the weights or their EMA, with batch statistics
  from precise BN over `bn_images`, or the running averages when `bn_images` is None.

  The state is left as it is: training continues from its own running statistics.
  """
  variables = {'params': state.validated_params, 'batch_stats': state.batch_stats}
  if bn_images is not None and state.batch_stats:
    variables['batch_stats'] = precise_batch_stats(state.model, variables, bn_images,
                                                   batch_size)
  return variables


# ---------------------------------------------------------------------------- the loop


DIVERGED_ADVICE = ('checkpoints from before it are kept. Try a lower --config.learning_rate '
                   '(e.g. 3e-4) or --config.batch_norm=True')


class EpochSums:
  """The epoch's training sums (loss, correct, count), added on the device: nothing in the loop
  waits for a step."""

  def __init__(self, steps_per_epoch: int, sums: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    self.steps_per_epoch = steps_per_epoch
    self.sums = jnp.asarray(sums, jnp.float32)
    self.bad_step = jnp.int32(-1)

  def add(self, m: dict) -> None:
    self.sums = self.sums + m['sums']
    self.bad_step = jnp.where((self.bad_step < 0) & ~m['finite'], m['step'], self.bad_step)

  def host(self) -> tuple[float, float, float]:
    """The sums as floats; raises TrainingDiverged if a step so far was not finite."""
    bad = int(self.bad_step)
    if bad >= 0:
      raise errors.TrainingDiverged(
          f'the training loss or parameters became NaN/inf at step {bad} (epoch '
          f'{bad // self.steps_per_epoch + 1}); {DIVERGED_ADVICE}')
    return tuple(float(x) for x in self.sums)


class Loop(NamedTuple):
  """What `train_loop` runs besides the state and the batches."""
  hp: dict  # the traced hyperparameters (`hyperparams`)
  data_aug: bool
  erase: bool
  steps_per_epoch: int
  after_step: Callable[[TrainState, EpochSums], bool]  # True stops the loop now (a signal)
  end_of_epoch: Callable[[TrainState, EpochSums], bool]  # True stops (early stopping)


def train_loop(state: TrainState, batches: Iterable[dict], loop: Loop,
               sums: EpochSums | None = None) -> TrainState:
  """Trains on `batches` from state.step until they end or a hook says stop.

  `sums` carries a resumed epoch's sums; each epoch's end gets fresh ones.
  """
  sums = sums or EpochSums(loop.steps_per_epoch)
  step = int(state.step)
  for batch in batches:
    state, metrics = train_step(state, batch, loop.hp, data_aug=loop.data_aug,
                                erase=loop.erase)
    step += 1
    sums.add(metrics)
    if loop.after_step(state, sums):
      break
    if step % loop.steps_per_epoch == 0:
      if loop.end_of_epoch(state, sums):
        break
      sums = EpochSums(loop.steps_per_epoch)
  return state
