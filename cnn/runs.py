"""How a training run is managed: `train_and_evaluate(config, workdir)`.

The workdir (its lock, config.json, refusing another config, moving an old run aside), resume
and the finished-run check, checkpoints, the writers, signals and preemption, `wandb agent`'s
semantics, the compilation cache and the summary. The arithmetic lives in `cnn/trainer.py`,
which this module drives through `trainer.Loop`'s two hooks.

    WORKDIR/config.json     the run's config and the code's version
    WORKDIR/metrics.jsonl   one line per finished epoch
    WORKDIR/summary.json    written when training ends
    WORKDIR/checkpoints/    see cnn/checkpoints.py
    WORKDIR/lock            held while a training run lives (cnn/lock.py)
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from cnn import __version__
from cnn import checkpoints
from cnn import config as config_lib
from cnn import download
from cnn import errors
from cnn import feeding
from cnn import input_pipeline
from cnn import lock
from cnn import metrics_writer
from cnn import models
from cnn import progress
from cnn import trainer

EpochCallback = Callable[[int, dict[str, float]], bool]


class Preempted(SystemExit):
  """SIGTERM/SIGINT arrived; the state at the current step was saved."""


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


@dataclasses.dataclass
class Progress:
  """What a resumed run needs besides the TrainState: the checkpoint's meta."""
  sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # loss_sum, correct, count of this epoch
  epoch_time_s: float = 0.0  # training time spent in this epoch so far
  stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)

  def to_meta(self) -> dict:
    return {'sums': list(self.sums), 'epoch_time_s': self.epoch_time_s,
            'stopping': dataclasses.asdict(self.stopping)}

  @classmethod
  def from_meta(cls, meta: dict) -> 'Progress':
    return cls(tuple(meta['sums']), meta['epoch_time_s'], EarlyStopping(**meta['stopping']))


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

  In a multi-process run JAX's preemption service takes SIGTERM instead: a signal to any process
  stops them all at one step they agree on (`reached_preemption_sync_point`).
  """

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def check(self, step: int) -> bool:
    """True when the run must stop after step `step`."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.received = 'SIGTERM'
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def is_main_process() -> bool:
  """Process 0 writes metrics, summaries, figures and W&B; every process writes checkpoints."""
  return jax.process_index() == 0


class Run:
  """One training run: the hooks `trainer.train_loop` calls, and what they need."""

  def __init__(self, config: ml_collections.ConfigDict, data: input_pipeline.Dataset,
               workdir: str, epoch_callback: EpochCallback | None):
    self.config, self.data, self.workdir = config, data, workdir
    self.epoch_callback = epoch_callback
    self.steps_per_epoch = len(data.train_labels) // config.batch_size
    self.progress = Progress()
    self.writer = metrics_writer.MetricsWriter(config, workdir, enabled=is_main_process())
    self.bar = progress.EpochBar(self.steps_per_epoch, config.batch_size, config.num_epochs)
    self.stop = _StopSignal()
    self.timing: dict[str, float] = {}
    self._step = self._epoch_t0 = 0
    self._shown_sums = None  # the sums of the step before: the bar reads them a step late
    sample = lambda n, seed: trainer.fixed_sample(data.train_labels, n, config.batch_size, seed)
    precise = config.bn_stats == 'precise'
    self.bn_images = data.train_images[sample(config.precise_bn_images, config.seed)] \
        if precise else None
    gap = sample(config.bn_gap_images, config.seed + 1)
    self.gap_arrays = (data.train_images[gap], data.train_labels[gap])
    self.data_on_device = feeding.use_device_feed(
        config.device_data, data.train_images.nbytes, config.device_data_max_fraction)

  def loop(self) -> trainer.Loop:
    c = self.config
    return trainer.Loop(trainer.hyperparams(c, self.steps_per_epoch), bool(c.data_aug),
                        bool(c.data_aug and c.aug_erase), self.steps_per_epoch,
                        self.after_step, self.end_of_epoch)

  def batches(self, step: int) -> Iterator[dict[str, jax.Array]]:
    """The training batches, on the devices, from global step `step` to the end of num_epochs."""
    feed = (feeding.DeviceFeed if self.data_on_device else feeding.HostFeed)(
        self.data.train_images, self.data.train_labels, feeding.make_mesh())
    if self.data_on_device:
      print(f'training images on the device(s): {self.data.train_images.nbytes / 2**20:.0f} MiB '
            '(--config.device_data=off keeps them on the host)')
    first_epoch, start = divmod(step, self.steps_per_epoch)
    n, c = len(self.data.train_labels), self.config
    for epoch in range(first_epoch, c.num_epochs):
      for idx in input_pipeline.batch_indices(n, c.batch_size, c.seed, epoch,
                                              start if epoch == first_epoch else 0):
        yield feed(idx)

  def start_epoch(self, step: int, elapsed_s: float = 0.0) -> None:
    self._step, self._epoch_t0, self._shown_sums = step, time.time() - elapsed_s, None
    self.bar.start(step // self.steps_per_epoch + 1, step % self.steps_per_epoch)

  def after_step(self, state: trainer.TrainState, sums: trainer.EpochSums) -> bool:
    """The bar, the first-step timer, mid-epoch checkpoints and signals; True stops the run."""
    self._step += 1
    spe, every = self.steps_per_epoch, self.config.checkpoint_every_steps
    if self._shown_sums is not None:
      self.bar.update(self._step % spe or spe, self._shown_sums)
    self._shown_sums = sums.sums
    if 'time_to_first_step_s' not in self.timing:
      jax.block_until_ready(state.step)
      self.timing['time_to_first_step_s'] = time.time() - self.timing['start']
      print(f'first step done {self.timing["time_to_first_step_s"]:.1f} s after start '
            f'(data {self.timing["data_load_s"]:.1f} s)', flush=True)
    stop = self.stop.check(self._step)
    if stop or (every and self._step % every == 0):
      self.progress.sums = sums.host()
      self.progress.epoch_time_s = time.time() - self._epoch_t0
      self.save_latest(state)
      if stop:
        self.bar.end()
        return True
    return False

  def end_of_epoch(self, state: trainer.TrainState, sums: trainer.EpochSums) -> bool:
    """Validates, logs, checkpoints and decides on early stopping; True stops the run."""
    self.bar.end()
    epoch, c = self._step // self.steps_per_epoch, self.config
    loss_sum, correct, count = sums.host()
    elapsed = time.time() - self._epoch_t0
    metrics = {'train_loss': loss_sum / count, 'train_acc': correct / count,
               'epoch_time_s': elapsed, 'images_per_second': count / elapsed}
    val_metrics, validated = self.validate(state, epoch)
    metrics.update(val_metrics)
    stopping = self.progress.stopping
    if stopping.update(epoch, metrics['val_acc'], c):
      checkpoints.save_best(self.workdir, int(state.step), validated, {
          'epoch': epoch, 'val_acc': metrics['val_acc'], 'class_names': self.data.class_names})
    if self.epoch_callback is not None and self.epoch_callback(epoch, metrics):
      stopping.stopped_early_by = 'callback'
    self.progress.sums, self.progress.epoch_time_s = (0.0, 0.0, 0.0), 0.0
    self.writer.write(epoch, metrics)  # before the checkpoint: a resume never skips a line
    self.save_latest(state)
    if epoch < c.num_epochs and not stopping.stopped_early_by:
      self.start_epoch(self._step)
    return bool(stopping.stopped_early_by)

  def validate(self, state: trainer.TrainState, epoch: int) -> tuple[dict[str, float], dict]:
    """(hold-out metrics, the eval-mode variables they score); the bn_gap diagnostic is of the
    same variables."""
    c, t0 = self.config, time.time()
    variables = trainer.validated_variables(state, self.bn_images, c.batch_size)
    metrics = trainer.bn_gap(state.model, variables, self.gap_arrays, c.batch_size) \
        if c.bn_gap_images else {}
    holdout = (self.data.holdout_images, self.data.holdout_labels)
    val_loss, val_acc = trainer.evaluate_arrays(state.model, variables, holdout,
                                                c.eval_batch_size, c.tta_flip)
    if not np.isfinite(val_loss):  # finite parameters that are useless: not a checkpoint to keep
      raise errors.TrainingDiverged(
          f'the validation loss became NaN/inf after step {int(state.step)} (end of epoch '
          f'{epoch}); {trainer.DIVERGED_ADVICE}')
    # eval_time_s includes precise BN (and the bn_gap diagnostic).
    return {**metrics, 'val_loss': val_loss, 'val_acc': val_acc, 'step': int(state.step),
            'eval_time_s': time.time() - t0}, variables

  def save_latest(self, state: trainer.TrainState) -> None:
    checkpoints.save_latest(self.workdir, state, self.progress.to_meta(),
                            keep=self.config.keep_checkpoints)


# ---------------------------------------------------------------------------- the workdir


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose run has another config, unless new_run moves that run aside."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  old = checkpoints.load_run_config(workdir)
  old_fields, fields = config_lib.run_fields(old), config_lib.run_fields(config)
  listed = config_lib.config_diff(old_fields, fields)
  if not listed:
    return
  if not config.new_run:
    raise errors.WorkdirError(
        f'{workdir} holds a run with a different config ({listed}). Use another --workdir, '
        f'resume that run as it was with {config_lib.flags_to_restore(old_fields, fields)}, or '
        f'pass --config.new_run=True to keep that run under {workdir}/previous_runs/ and start '
        'anew')
  _sync('read the old run')
  if is_main_process():
    dest = os.path.join(workdir, 'previous_runs', time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(dest)
    for name in os.listdir(workdir):
      if name not in ('previous_runs', 'lock'):
        shutil.move(os.path.join(workdir, name), dest)
    print(f'moved the previous run ({listed}) to {dest}')
  _sync('moved the old run')


def _sync(name: str) -> None:
  """Every process waits here for the others (nothing to wait for in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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


def _summary(run: Run, state: trainer.TrainState) -> dict:
  history = _read_history(run.workdir, int(state.step) // run.steps_per_epoch)
  steady = [h['images_per_second'] for h in history[1:]] or [
      h['images_per_second'] for h in history]
  s, data, n_val, c = run.progress.stopping, run.data, len(run.data.holdout_labels), run.config
  best = max(s.best_val_acc, 0)
  return {
      'status': 'completed',
      'version': __version__,
      'best_val_accuracy': s.best_val_acc,
      'best_epoch': s.best_epoch,
      # How far the chosen epoch's val can be trusted: the binomial standard error on the
      # hold-out; choosing the best of many epochs also flatters it (docs/validation.md).
      'best_val_accuracy_stderr': float(np.sqrt(best * (1 - best) / max(n_val, 1))),
      'model_selection': (f'val_acc EMA (smoothing {c.early_stopping_smoothing})'
                          if c.early_stopping_smoothing else 'val_acc'),
      'bn_stats': c.bn_stats,
      'validated_weights': f'EMA over {c.ema_epochs:g} epochs' if c.ema_epochs else 'the weights',
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
      'num_processes': jax.process_count(),
      'data_on_device': run.data_on_device,
      **{k: v for k, v in run.timing.items() if k != 'start'},
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
  return config.copy_and_resolve_references(), data


def _restore(run: Run) -> trainer.TrainState:
  """The workdir's latest checkpoint, or a fresh state; metrics.jsonl cut to match it."""
  fresh = trainer.create_train_state(run.config, len(run.data.class_names),
                                     jax.random.PRNGKey(run.config.seed))
  state = feeding.replicate(fresh, feeding.make_mesh())
  restored = checkpoints.restore_latest(run.workdir, state)
  if restored is not None:
    state, run.progress = restored[0], Progress.from_meta(restored[1])
    epoch, batch = divmod(int(state.step), run.steps_per_epoch)
    print(f'resuming {run.workdir} at step {int(state.step)} (epoch {epoch + 1}, batch {batch})')
  if is_main_process():
    history = _read_history(run.workdir, int(state.step) // run.steps_per_epoch)
    with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(h) + '\n' for h in history)
  return state


def _train(run: Run, state: trainer.TrainState) -> trainer.TrainState:
  """Trains to the end; a signal ends the process with Preempted, except under `wandb agent`,
  whose SIGTERM is W&B's early termination: a finished run, not a crash."""
  step, stopping = int(state.step), run.progress.stopping
  run.start_epoch(step, run.progress.epoch_time_s)
  sums = trainer.EpochSums(run.steps_per_epoch, run.progress.sums)
  if step % run.steps_per_epoch == 0 and run.progress.sums[2]:
    run.end_of_epoch(state, sums)  # stopped after an epoch's last step, before validation
    sums = trainer.EpochSums(run.steps_per_epoch)
  if stopping.stopped_early_by:
    return state
  with run.stop:
    state = trainer.train_loop(state, run.batches(int(state.step)), run.loop(), sums)
  if run.stop.received is None:
    return state
  if not os.environ.get('WANDB_SWEEP_ID'):
    epoch, batch = divmod(int(state.step), run.steps_per_epoch)
    raise Preempted(f'{run.stop.received}: saved a checkpoint at step {int(state.step)} (epoch '
                    f'{epoch + 1}, batch {batch}); run the same command again to resume')
  stopping.stopped_early_by = 'wandb_agent'
  return state


# What the run's small files (lock, config.json, metrics.jsonl, summary.json) need at most.
_SMALL_FILES_BYTES = 2**16


@contextlib.contextmanager
def _workdir(workdir: str) -> Iterator[None]:
  """The workdir, made and locked for this run: process 0 holds the lock for all processes, and
  a refusal stops every one of them."""
  os.makedirs(workdir, exist_ok=True)
  checkpoints.check_version(workdir)
  with contextlib.ExitStack() as stack:
    refusal = None
    if is_main_process():
      try:
        stack.enter_context(lock.hold(workdir))
      except errors.WorkdirError as e:
        refusal = e
    refused = refusal is not None
    if jax.process_count() > 1:
      refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
      raise refusal or errors.WorkdirError(
          f'{workdir} is in use by another training run (process 0 of this run says so)')
    yield


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       epoch_callback: EpochCallback | None = None,
                       data: input_pipeline.Dataset | None = None) -> dict:
  """Trains (or resumes, or finds finished) the run in `workdir`; returns its summary.

  `epoch_callback(epoch, metrics)` runs after each epoch's validation; True stops the run
  (hyperband early termination in sweeps). `data` skips reading `config.data_dir`.
  """
  t_start = time.time()
  config_lib.validate(config)
  kept = functools.partial(checkpoints.kept_message, workdir)
  with errors.disk_full_guard(workdir, _SMALL_FILES_BYTES, kept), _workdir(workdir):
    _check_workdir(config, workdir)
    done = _completed_summary(config, workdir)
    if done is not None:
      print(f'{workdir}: run already complete (best val_acc {done["best_val_accuracy"]:.4f} at '
            f'epoch {done["best_epoch"]}); nothing to do. Use another --workdir to train again.')
      return done
    config, data = _prepare(config, data)
    enable_compilation_cache(config)
    run = Run(config, data, workdir, epoch_callback)
    run.timing.update(start=t_start, data_load_s=time.time() - t_start)
    try:
      state = _restore(run)
      if is_main_process():
        checkpoints.save_run_config(workdir, config)
      state = _train(run, state)
      run.timing['wall_time_s'] = time.time() - t_start
      _sync('metrics written')
      summary = _summary(run, state)
      if is_main_process():
        checkpoints.write_json(os.path.join(workdir, 'summary.json'), summary)
      run.writer.write_summary(summary)
    finally:
      run.writer.close()
  print(f'best val_acc {summary["best_val_accuracy"]:.4f} at epoch {summary["best_epoch"]} '
        f'of {summary["epochs_run"]}; results in {workdir}')
  return summary


def run_train(config: ml_collections.ConfigDict, workdir: str, args: list[str]) -> int:
  """--mode=train."""
  if args:
    raise config_lib.ConfigError(f'--mode=train takes no positional arguments, got {args}')
  train_and_evaluate(config, workdir)
  return 0
