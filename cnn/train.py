"""TrainState, the jitted train and eval steps, and `train_and_evaluate(config, workdir)`."""

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from cnn import augment
from cnn import checkpoints
from cnn import config as config_lib
from cnn import download
from cnn import input_pipeline
from cnn import metrics_writer
from cnn import models

EpochCallback = Callable[[int, dict[str, float]], bool]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; step t uses fold_in(rng, t), so resuming repeats the run
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  data_aug: bool = flax.struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


class Preempted(SystemExit):
  """SIGTERM/SIGINT arrived; the state at the current step was saved."""


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  lr = config.learning_rate
  return {
      'adam': lambda: optax.adam(lr),
      'adamw': lambda: optax.adamw(lr, weight_decay=config.weight_decay),
      'nadam': lambda: optax.nadam(lr),
      'sgd': lambda: optax.sgd(lr, momentum=config.momentum),
      'rmsprop': lambda: optax.rmsprop(lr, momentum=config.momentum),
  }[config.optimizer]()


def create_train_state(config: ml_collections.ConfigDict, num_classes: int,
                       rng: jax.Array) -> TrainState:
  """Fresh parameters, batch statistics and optimizer state for `config`."""
  model = models.create_model(config, num_classes)
  init_rng, state_rng = jax.random.split(rng)
  variables = models.init_variables(model, config.image_size, init_rng)
  tx = make_optimizer(config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(variables['params']), rng=state_rng,
                    apply_fn=model.apply, tx=tx, data_aug=config.data_aug)


def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0  # (B, H, W, 3) uint8 -> [0, 1]


def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  dropout_key, aug_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
  images = _to_float(batch['image'])
  if state.data_aug:
    images = augment.augment(aug_key, images)
  # The barrier keeps XLA from fusing the input's conversion and the warp's gathers into the
  # convolutions, which then recompute them many times (a 96 px step: 1.05 s -> 0.7 s).
  images = jax.lax.optimization_barrier(images)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, opt_updates)
  new_state = state.replace(step=state.step + 1, params=new_params,
                            batch_stats=updates.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  # A finite loss can still give non-finite parameters (an overflowing update); they must never
  # reach a checkpoint, so they count as divergence at this step too.
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(new_params)]))
  n = batch['label'].shape[0]
  metrics = {'loss_sum': loss * n,
             'correct': jnp.sum(jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32),
             'count': jnp.float32(n), 'finite': finite, 'step': state.step}
  return new_state, metrics


# The old state's buffers are reused for the new one: no second copy of params and Adam moments.
train_step = jax.jit(_train_step, donate_argnums=0)


@jax.jit
def eval_step(state: TrainState, batch: dict) -> dict:
  """Sums of loss, correct predictions and count over the unmasked examples of a batch."""
  logits = state.apply_fn(state.variables, _to_float(batch['image']), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  mask = batch['mask']
  return {'loss_sum': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


# ---------------------------------------------------------------------------- devices


def make_mesh() -> Mesh:
  """All devices of all hosts on one 'data' axis: the batch is split, the state replicated."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global numpy batch -> arrays split over the mesh; each host contributes its own slice."""
  sharding = NamedSharding(mesh, P('data'))
  n, i = jax.process_count(), jax.process_index()

  def local(x):
    per_host = x.shape[0] // n
    return jax.make_array_from_process_local_data(sharding, x[i * per_host:(i + 1) * per_host])

  return {k: local(v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def evaluate_arrays(state: TrainState, images: np.ndarray, labels: np.ndarray,
                    batch_size: int, mesh: Mesh) -> tuple[float, float]:
  """(mean loss, accuracy) of the state's model on all given images."""
  totals = None
  for batch in input_pipeline.eval_batches(images, labels, batch_size):
    m = eval_step(state, shard_batch(batch, mesh))
    totals = m if totals is None else jax.tree_util.tree_map(jnp.add, totals, m)
  count = float(totals['count'])
  return float(totals['loss_sum']) / count, float(totals['correct']) / count


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Progress:
  """Everything besides the TrainState that a resumed run needs; saved beside each checkpoint."""
  epoch: int = 0  # finished epochs
  batch: int = 0  # batches done of the epoch under way
  sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # loss_sum, correct, count of that epoch
  epoch_time_s: float = 0.0  # training time spent in that epoch so far
  best_val_acc: float = -1.0
  best_epoch: int = 0
  bad_epochs: int = 0
  stopped_early_by: str | None = None  # 'patience' or 'callback'
  history: list[dict] = dataclasses.field(default_factory=list)

  def done(self, num_epochs: int) -> bool:
    return self.stopped_early_by is not None or self.epoch >= num_epochs


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


def run_defining_config(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(json.dumps(config.to_dict(), default=str))
  return {k: v for k, v in d.items() if k not in config_lib.NON_RUN_FIELDS}


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose run has another config, unless new_run moves that run aside."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  old = {k: v for k, v in checkpoints.read_json(path).items()
         if k not in config_lib.NON_RUN_FIELDS}
  new = run_defining_config(config)
  diffs = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)}
  if not diffs:
    return
  listed = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diffs.items())
  if not config.new_run:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({listed}). Use another --workdir, or '
        f'pass --config.new_run=True to keep that run under {workdir}/previous_runs/ and start anew')
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


def _epoch_loop(state, data, config, progress, mesh, stop, save, first_step_fn):
  """Runs the rest of the current epoch; returns (state, train metrics) or raises Preempted."""
  sums = jnp.asarray(progress.sums, jnp.float32)
  bad_step = jnp.int32(-1)
  t0 = time.time() - progress.epoch_time_s
  for batch in input_pipeline.train_batches(data.train_images, data.train_labels,
                                            config.batch_size, config.seed, progress.epoch,
                                            start=progress.batch):
    state, m = train_step(state, shard_batch(batch, mesh))
    sums = sums + jnp.stack([m['loss_sum'], m['correct'], m['count']])
    bad_step = jnp.where((bad_step < 0) & ~m['finite'], m['step'], bad_step)
    progress.batch += 1
    if first_step_fn is not None:
      jax.block_until_ready(state.step)
      first_step_fn()
      first_step_fn = None
    every = config.checkpoint_every_steps
    if stop.received or (every and int(state.step) % every == 0):
      _raise_if_diverged(bad_step, progress.epoch)
      progress.sums, progress.epoch_time_s = tuple(map(float, sums)), time.time() - t0
      save(state, progress)
      if stop.received:
        raise Preempted(f'{stop.received}: saved a checkpoint at step {int(state.step)} '
                        f'(epoch {progress.epoch + 1}, batch {progress.batch}); run the same '
                        f'command again to resume')
  _raise_if_diverged(bad_step, progress.epoch)
  loss_sum, correct, count = (float(x) for x in sums)
  return state, {'train_loss': loss_sum / count, 'train_acc': correct / count,
                 'epoch_time_s': time.time() - t0, 'images_per_second': count / (time.time() - t0)}


_DIVERGED_ADVICE = ('checkpoints from before it are kept. Try a lower --config.learning_rate '
                    '(e.g. 3e-4) or --config.batch_norm=True')


def _raise_if_diverged(bad_step: jax.Array, epoch: int) -> None:
  if int(bad_step) >= 0:
    raise TrainingDiverged(f'the training loss or parameters became NaN/inf at step '
                           f'{int(bad_step)} (epoch {epoch + 1}); {_DIVERGED_ADVICE}')


def _end_of_epoch(state, data, config, progress, mesh, train_metrics, workdir, writer,
                  epoch_callback) -> None:
  """Validates, logs, checkpoints and decides on early stopping after a finished epoch."""
  val_loss, val_acc = evaluate_arrays(state, data.holdout_images, data.holdout_labels,
                                      config.eval_batch_size, mesh)
  epoch = progress.epoch + 1
  if not np.isfinite(val_loss):  # finite parameters that are useless: not a checkpoint to keep
    raise TrainingDiverged(f'the validation loss became NaN/inf after step {int(state.step)} '
                           f'(end of epoch {epoch}); {_DIVERGED_ADVICE}')
  metrics = {**train_metrics, 'val_loss': val_loss, 'val_acc': val_acc, 'step': int(state.step)}
  progress.epoch, progress.batch, progress.sums, progress.epoch_time_s = epoch, 0, (0., 0., 0.), 0.
  progress.history.append({'epoch': epoch, **metrics})
  if val_acc > progress.best_val_acc:
    progress.best_val_acc, progress.best_epoch, progress.bad_epochs = val_acc, epoch, 0
    checkpoints.save_best(workdir, state, {'epoch': epoch, 'val_acc': val_acc,
                                           'class_names': data.class_names})
  else:
    progress.bad_epochs += 1
  if config.early_stopping_patience and progress.bad_epochs >= config.early_stopping_patience:
    progress.stopped_early_by = 'patience'
  if epoch_callback is not None and epoch_callback(epoch, metrics):
    progress.stopped_early_by = 'callback'
  checkpoints.save_latest(workdir, state, dataclasses.asdict(progress))
  writer.write(epoch, metrics)


def _summary(config, data, state, progress, timing) -> dict:
  steady = [h['images_per_second'] for h in progress.history[1:]] or [
      h['images_per_second'] for h in progress.history]
  return {
      'status': 'completed',
      'best_val_accuracy': progress.best_val_acc,
      'best_epoch': progress.best_epoch,
      'epochs_run': progress.epoch,
      'final_val_accuracy': progress.history[-1]['val_acc'] if progress.history else None,
      'stopped_early_by': progress.stopped_early_by,
      'num_params': models.count_parameters(state.params),
      'num_batch_stats': models.count_parameters(state.batch_stats),
      # Median over epochs after the first, whose time includes compilation.
      'train_images_per_second': float(np.median(steady)) if steady else None,
      'class_names': data.class_names,
      'num_train_images': len(data.train_labels),
      'num_holdout_images': len(data.holdout_labels),
      'num_test_images': len(data.test_labels),
      'skipped_images': data.skipped,
      'num_skipped_images': len(data.skipped),
      'num_devices': jax.device_count(),
      **timing,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       epoch_callback: EpochCallback | None = None) -> dict:
  """Trains (or resumes, or finds finished) the run in `workdir`; returns its summary.

  `epoch_callback(epoch, metrics)` runs after each epoch's validation; True stops the run
  (hyperband early termination in sweeps).
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

  download.ensure_dataset(config)
  data = input_pipeline.load_dataset(config)
  if data.skipped:
    print(f'warning: {len(data.skipped)} unreadable images skipped (listed in summary.json)')
  mesh = make_mesh()
  if config.batch_size % jax.device_count():
    raise config_lib.ConfigError(f'batch_size={config.batch_size} must be a multiple of the '
                                 f'{jax.device_count()} devices')
  if len(data.train_labels) < config.batch_size:
    raise config_lib.ConfigError(f'only {len(data.train_labels)} training images for '
                                 f'batch_size={config.batch_size}; lower --config.batch_size')
  config = config.copy_and_resolve_references()
  config.eval_batch_size = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()

  state = create_train_state(config, len(data.class_names), jax.random.PRNGKey(config.seed))
  state = replicate(state, mesh)
  progress = Progress()
  restored = checkpoints.restore_latest(workdir, state)
  if restored is not None:
    state, meta = restored
    progress = Progress(**{**meta, 'sums': tuple(meta['sums'])})
    print(f'resuming {workdir} at step {int(state.step)} (epoch {progress.epoch + 1}, '
          f'batch {progress.batch})')
  checkpoints.save_run_config(workdir, config)
  # metrics.jsonl always matches the checkpoint: epochs logged after it are dropped.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(h) + '\n' for h in progress.history)
  timing = {'data_load_s': time.time() - t_start}

  def first_step():
    timing['time_to_first_step_s'] = time.time() - t_start
    print(f'first step done {timing["time_to_first_step_s"]:.1f} s after start '
          f'(data {timing["data_load_s"]:.1f} s)', flush=True)

  writer = metrics_writer.MetricsWriter(config, workdir)
  save = lambda s, p: checkpoints.save_latest(workdir, s, dataclasses.asdict(p))
  try:
    with _StopSignal() as stop:
      while not progress.done(config.num_epochs):
        try:
          state, train_metrics = _epoch_loop(state, data, config, progress, mesh, stop, save,
                                             first_step if 'time_to_first_step_s' not in timing
                                             else None)
        except Preempted:
          # Under `wandb agent` SIGTERM is W&B's early termination: a finished run, not a crash.
          if not os.environ.get('WANDB_SWEEP_ID'):
            raise
          progress.stopped_early_by = 'wandb_agent'
          break
        _end_of_epoch(state, data, config, progress, mesh, train_metrics, workdir, writer,
                      epoch_callback)
    timing['wall_time_s'] = time.time() - t_start
    summary = _summary(config, data, state, progress, timing)
    checkpoints.write_json(os.path.join(workdir, 'summary.json'), summary)
    writer.write_summary(summary)
  finally:
    writer.close()
  print(f'best val_acc {summary["best_val_accuracy"]:.4f} at epoch {summary["best_epoch"]} '
        f'of {summary["epochs_run"]}; results in {workdir}')
  return summary


def run_train(config: ml_collections.ConfigDict, workdir: str, args: list[str]) -> int:
  """--mode=train."""
  if args:
    raise config_lib.ConfigError(f'--mode=train takes no positional arguments, got {args}')
  train_and_evaluate(config, workdir)
  return 0
