"""One place that every epoch's metrics go through: W&B, WORKDIR/metrics.jsonl and the terminal."""

import json
import netrc
import os
import pathlib
import sys
import threading
from typing import Any
import urllib.error
import urllib.request
import uuid

import ml_collections

from cnn import config as config_lib
from cnn import lock

# Seconds to wait for wandb's service process to exit after a failed online init.
TEARDOWN_TIMEOUT_S = 10.0


def resolve_wandb_mode(mode: str) -> str:
  """'' means online with credentials, offline without; says which in one line."""
  if mode:
    return mode
  try:
    credentials = bool(os.environ.get('WANDB_API_KEY')) or (
        netrc.netrc().authenticators('api.wandb.ai') is not None)
  except (FileNotFoundError, netrc.NetrcParseError):
    credentials = False
  if credentials:
    print('W&B: credentials found, logging online (--config.wandb_mode=disabled to turn off)')
    return 'online'
  print('W&B: no credentials (wandb login), logging offline to WORKDIR/wandb; '
        'upload later with `wandb sync`')
  return 'offline'


class MetricsWriter:
  """Appends epochs to metrics.jsonl, logs them to W&B (per wandb_mode) and prints one line;
  with `enabled=False` (every process but the first of a multi-host run) writes nothing."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, enabled: bool = True):
    self._workdir = workdir
    self._num_epochs = config.num_epochs
    self._enabled = enabled
    self._run = None
    mode = resolve_wandb_mode(config.wandb_mode)
    if mode != 'disabled' and enabled:
      self._run = _init_wandb(config, workdir, mode)

  def write(self, epoch: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    with open(os.path.join(self._workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'epoch': epoch, **metrics}) + '\n')
    print(f'epoch {epoch:3d}/{self._num_epochs}'
          f'  train loss {metrics["train_loss"]:.4f} acc {metrics["train_acc"]:.4f}'
          f'  |  val loss {metrics["val_loss"]:.4f} acc {metrics["val_acc"]:.4f}'
          f'  |  {metrics["images_per_second"]:7.1f} img/s  {metrics["epoch_time_s"]:6.1f} s',
          flush=True)
    if self._run is not None:
      self._run.log({'epoch': epoch, **metrics})

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self._run is not None:
      for k, v in summary.items():
        if isinstance(v, (int, float, str)):
          self._run.summary[k] = v

  def log_images(self, images: dict[str, str]) -> None:
    """Logs PNG files by name; a no-op without W&B."""
    if self._run is not None:
      import wandb
      self._run.log({name: wandb.Image(path) for name, path in images.items()})

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None


def beside_training(config: ml_collections.ConfigDict, workdir: str) -> MetricsWriter:
  """The writer of a mode that starts from a trained workdir (evaluate, guided_bp): disabled,
  with a line saying so, while a training run holds the workdir and logs to its W&B run."""
  live = lock.holder(workdir) is not None
  if live:
    print(f'not logging to W&B: a training run holds {workdir} and logs to its W&B run')
  return MetricsWriter(config, workdir, enabled=not live)


def _init_wandb(config: ml_collections.ConfigDict, workdir: str, mode: str):
  """A W&B run that resumes with the workdir; trouble going online falls back to offline."""
  import wandb
  id_file = pathlib.Path(workdir, 'wandb_run_id.txt')
  kwargs = dict(project=config.wandb_project, entity=config.wandb_entity or None,
                name=config_lib.run_name(config), config=config.to_dict(), dir=workdir)
  if not os.environ.get('WANDB_SWEEP_ID'):  # under `wandb agent` the agent picks the run id
    if not id_file.exists():
      id_file.write_text(uuid.uuid4().hex[:8])
    kwargs.update(id=id_file.read_text().strip(), resume='allow')
  if mode == 'online':
    # wandb.init retries an unreachable server for init_timeout (a minute or more): ask first.
    base_url = wandb.setup().settings.base_url
    why = _unreachable(base_url)
    if why is not None:
      return _init_offline(wandb, workdir, kwargs, f'cannot reach {base_url}: {why}')
  try:
    return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60), **kwargs)
  except Exception as e:  # bad credentials, server trouble: never lose the training
    if mode != 'online':
      raise
    return _init_offline(wandb, workdir, kwargs, f'{type(e).__name__}: {e}')


def _unreachable(url: str, timeout: float = 10.0) -> str | None:
  """Why nothing answers at `url` (refused, timed out, no DNS), or None if any HTTP reply came."""
  try:
    urllib.request.urlopen(url, timeout=timeout).close()
  except urllib.error.HTTPError:
    pass  # it answered; whether the credentials are good is wandb.init's to say
  except (urllib.error.URLError, OSError, ValueError) as e:
    return str(getattr(e, 'reason', e))
  return None


def _init_offline(wandb, workdir: str, kwargs: dict, why: str):
  print(f'warning: W&B online failed ({why}); logging offline to {workdir}/wandb instead, '
        'upload later with `wandb sync`', file=sys.stderr, flush=True)
  # A failed online init can leave its run id taken in wandb's service process: start afresh.
  # When that init broke the link to the service, wandb.teardown waits for it forever; wandb
  # forgets its service before that wait, so giving up after TEARDOWN_TIMEOUT_S is safe (the
  # next init starts a fresh service, and the stale one exits with this process).
  teardown = threading.Thread(target=wandb.teardown, name='wandb-teardown', daemon=True)
  teardown.start()
  teardown.join(TEARDOWN_TIMEOUT_S)
  return wandb.init(mode='offline', **kwargs)
