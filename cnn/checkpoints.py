"""The workdir's layout and Orbax save/restore of the latest and the best training state.

    WORKDIR/config.json          the full config of the run
    WORKDIR/metrics.jsonl        one line per finished epoch
    WORKDIR/summary.json         written when training ends
    WORKDIR/checkpoints/latest/  full TrainState + progress (resume from here)
    WORKDIR/checkpoints/best/    params + batch stats the best validation epoch scored with
                                 (the weights' EMA when config.ema_epochs is on)
Orbax writes each checkpoint into a temporary folder and renames it, so a kill mid-write
leaves the previous checkpoint intact.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cnn import errors
from cnn import atomic
from cnn import models


def _manager(workdir: str, which: str) -> ocp.CheckpointManager:
  path = pathlib.Path(workdir).absolute() / 'checkpoints' / which
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options)


def _save(workdir: str, which: str, step: int, tree: Any, meta: dict) -> None:
  with _manager(workdir, which) as mngr:
    if step in mngr.all_steps():
      mngr.delete(step)  # same step again (e.g. a preemption right after an epoch): newest wins
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                             meta=ocp.args.JsonSave(meta)))


def _restore(workdir: str, which: str, target: Any = None) -> tuple[Any, dict] | None:
  with _manager(workdir, which) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def _fields(state: Any) -> dict:
  """The dataclass state's fields that are not None, as a dict: a run without an optional
  field (an EMA of the weights) saves the very tree that runs saved before the field existed,
  so checkpoints of either age restore."""
  values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {k: v for k, v in values.items() if v is not None}


def save_latest(workdir: str, state: Any, meta: dict) -> None:
  _save(workdir, 'latest', int(state.step), _fields(state), meta)


def restore_latest(workdir: str, target: Any) -> tuple[Any, dict] | None:
  """(state shaped and sharded like `target`, progress meta), or None without a checkpoint."""
  restored = _restore(workdir, 'latest', _fields(target))
  return None if restored is None else (target.replace(**restored[0]), restored[1])


def save_best(workdir: str, step: int, variables: dict, meta: dict) -> None:
  # As host numpy arrays: restorable on any device topology (trained on 8 TPUs, read on a CPU).
  _save(workdir, 'best', step, jax.device_get(variables), meta)


def restore_best(workdir: str) -> tuple[dict, dict]:
  """({'params', 'batch_stats'} as numpy pytrees, meta with epoch and val_acc) of the best epoch."""
  restored = _restore(workdir, 'best')
  if restored is None:
    raise errors.WorkdirError(
        f'no best checkpoint in {os.path.join(workdir, "checkpoints", "best")}; train first: '
        f'python main.py --config=configs/optimal.py --workdir={workdir}')
  return restored


def load_best_model(config: ml_collections.ConfigDict,
                    workdir: str) -> tuple[models.CNN, dict, list[str], dict]:
  """(model, variables, class names, checkpoint meta) of the workdir's best checkpoint."""
  variables, meta = restore_best(workdir)
  num_classes = int(np.shape(variables['params']['logits']['kernel'])[-1])
  model = models.create_model(config, num_classes)
  names = meta.get('class_names') or [f'class {i}' for i in range(num_classes)]
  return model, variables, list(names), meta


def write_json(path: str | os.PathLike, data: Any) -> None:
  """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
  atomic.atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + '\n'))


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, 'config.json'), config.to_dict())


def load_run_config(workdir: str,
                    defaults: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The workdir's config.json, laid over `defaults` when given (configs/default.py's config):
  fields added to the code after that run was trained then take their defaults."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise errors.WorkdirError(f'{path} not found: is {workdir!r} the workdir of a training run?')
  config = ml_collections.ConfigDict(read_json(path))
  if 'guided_bp_channels' in config:
    config.guided_bp_channels = tuple(config.guided_bp_channels)  # JSON gives a list
  if defaults is None:
    return config
  merged = defaults.copy_and_resolve_references()
  merged.update(config)
  return merged
