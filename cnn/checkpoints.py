"""The workdir's layout and Orbax save/restore of the latest and the best training state.

    WORKDIR/config.json               the full config of the run
    WORKDIR/metrics.jsonl             one line per finished epoch
    WORKDIR/summary.json              written when training ends
    WORKDIR/checkpoints/latest/STEP/  full TrainState + progress (resume from here), `keep` newest
    WORKDIR/checkpoints/best/STEP/    params + batch stats the best validation epoch scored with
                                      (the weights' EMA when config.ema_epochs is on)
    WORKDIR/checkpoints/unreadable/WHICH-STEP/  steps that failed to read, moved aside
A step holds `state` (the arrays), `meta` (JSON) and `checksum` (sha256 of the arrays' bytes).
Orbax writes a step into a temporary folder and renames it when complete, so a kill or a full disk
mid-write leaves the earlier steps intact; the next manager removes the temporary folder. A save
is read back and checked before older steps are deleted, so the steps kept are the newest good
ones; a restore that finds the newest step damaged moves it aside and uses the one before.
"""

import functools
import gc
import hashlib
import json
import os
import pathlib
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cnn import __version__
from cnn import atomic
from cnn import config as config_lib
from cnn import errors
from cnn import models


def _folder(workdir: str, which: str) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / 'checkpoints' / which


def _manager(folder: pathlib.Path) -> ocp.CheckpointManager:
  # No max_to_keep: Orbax would count a step before it is read back; _save deletes old steps.
  options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(folder, options=options)


def _host(x: Any) -> np.ndarray:
  """`x`'s values on this host; a replicated array spread over processes has a whole copy here."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = (x.addressable_data(0) if x.is_fully_replicated
         else multihost_utils.process_allgather(x, tiled=True))
  return np.ascontiguousarray(x)


def _checksum(tree: Any) -> str:
  """sha256 of the leaves' dtypes, shapes and bytes in tree order: the same on every process."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    a = _host(leaf)
    digest.update(f'{a.dtype}{a.shape}'.encode())
    digest.update(a.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process, so that all of them take the same branch."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync() -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoints: moved aside')


def _innermost(e: BaseException) -> str:
  """The first line of the innermost error in the chain: the one that names the file's fault."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:240]}'


def _try_read(mngr: ocp.CheckpointManager, step: int,
              target: Any) -> tuple[tuple[Any, dict] | None, str | None]:
  """((state, meta), None) when every process reads `step` intact, else (None, why not)."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
                            checksum=ocp.args.JsonRestore())
  # A failed restore leaves Orbax's reads of the other arrays unawaited: each would print an
  # 'Exception ignored' traceback when collected, burying the one line that says what happened.
  restored, hook, sys.unraisablehook = None, sys.unraisablehook, lambda _: None
  try:
    restored, reason = mngr.restore(step, args=args), None
  except Exception as e:  # Orbax and TensorStore raise many types for a missing or damaged file
    reason = _innermost(e)
  finally:
    if restored is None:
      gc.collect()  # here, once the error and its frames are gone
    sys.unraisablehook = hook
  if restored is not None and _checksum(restored.state) != (restored.checksum or {}).get('sha256'):
    reason = 'its arrays differ from their checksum'
  if not _everywhere(reason is None):
    return None, reason or 'unreadable on another process'
  return (restored.state, restored.meta), None


def _move_aside(folder: pathlib.Path, step: int) -> pathlib.Path:
  """Process 0 moves `step` to checkpoints/unreadable/<which>-<step>: kept for a look, never
  deleted. The caller then calls _sync before any process reads the folder again."""
  dest = base = folder.parent / 'unreadable' / f'{folder.name}-{step}'
  if jax.process_index() == 0:
    n = 1
    while dest.exists():  # the same step went bad before
      n += 1
      dest = base.with_name(f'{base.name}-{n}')
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder / str(step), dest)
  return dest


def _save(folder: pathlib.Path, step: int, tree: Any, meta: dict, keep: int) -> None:
  """Saves at `step` (replacing it), reads it back, then deletes all but the `keep` newest."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta),
                            checksum=ocp.args.JsonSave({'sha256': _checksum(tree)}))
  needed = sum(getattr(x, 'nbytes', 0) for x in jax.tree_util.tree_leaves(tree))
  # What a failure leaves to resume from: the newest step of checkpoints/latest.
  kept = functools.partial(kept_message, str(folder.parent.parent))
  with _manager(folder) as mngr:
    if step in mngr.all_steps():
      mngr.delete(step)  # the same step again (a preemption right after an epoch): newest wins
    with errors.disk_full_guard(str(folder), needed, kept, quiet=True):
      mngr.save(step, args=args)
    _, reason = _try_read(mngr, step, tree)
    if reason is not None:
      dest = _move_aside(folder, step)
      _sync()
      raise errors.WorkdirError(
          f'the checkpoint just saved at step {step} in {folder} does not read back ({reason}); '
          f'moved to {dest}; {kept()}. Check the disk, then run the same command again')
    steps = sorted(mngr.all_steps())
    for old in steps[:max(len(steps) - keep, 0)]:
      mngr.delete(old)


def kept_message(workdir: str) -> str:
  """What survives a failed write: the newest step of checkpoints/latest, if there is one."""
  folder = _folder(workdir, 'latest')
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
  return (f'the last good checkpoint (step {max(steps)}) is kept' if steps
          else 'there is no checkpoint yet')


def save_latest(workdir: str, state: Any, meta: dict, keep: int = 3) -> None:
  """Saves the training state and its progress at step int(state.step); keeps `keep` steps."""
  _save(_folder(workdir, 'latest'), int(state.step), state, meta, keep)


def _newest_readable(folder: pathlib.Path, target: Any,
                     tries: int | None = None) -> tuple[list[tuple[int, str]], Any]:
  """([(step, why)] of the unreadable steps tried, newest first; (step, (state, meta)) of the
  newest readable step or None), trying at most `tries` steps."""
  bad = []
  if folder.exists():
    with _manager(folder) as mngr:
      for step in sorted(mngr.all_steps(), reverse=True)[:tries]:
        result, reason = _try_read(mngr, step, target)
        if result is not None:
          return bad, (step, result)
        bad.append((step, reason))
  return bad, None


def restore_latest(workdir: str, target: Any) -> tuple[Any, dict] | None:
  """(state shaped and sharded like `target`, progress meta) of the newest readable step, or None
  without a checkpoint. Unreadable newer steps are moved to checkpoints/unreadable/."""
  folder = _folder(workdir, 'latest')
  bad, found = _newest_readable(folder, target)
  if found is None and bad:
    listed = '; '.join(f'step {s}: {r}' for s, r in bad)
    raise errors.WorkdirError(
        f'no checkpoint in {folder} is readable ({listed}); nothing was moved. Move the workdir '
        f'aside (mv {workdir} {workdir}.unreadable) and train again, or train into a new --workdir')
  for step, reason in bad:
    dest = _move_aside(folder, step)
    if jax.process_index() == 0:
      print(f'checkpoint at step {step} in {folder} is unreadable ({reason}); moved to {dest}; '
            f'resuming from step {found[0]}', flush=True)
  if bad:
    _sync()
  return None if found is None else found[1]


def save_best(workdir: str, step: int, variables: dict, meta: dict) -> None:
  # As host numpy arrays: restorable on any device topology (trained on 8 TPUs, read on a CPU).
  _save(_folder(workdir, 'best'), step, jax.device_get(variables), meta, keep=1)


def restore_best(workdir: str) -> tuple[dict, dict]:
  """({'params', 'batch_stats'} as numpy pytrees, meta with epoch and val_acc) of the best epoch."""
  folder = _folder(workdir, 'best')
  bad, found = _newest_readable(folder, None, tries=1)
  if bad:
    raise errors.WorkdirError(
        f'the best checkpoint at step {bad[0][0]} in {folder} is unreadable ({bad[0][1]}). Retrain '
        f'into a new --workdir, or move {folder} aside and train this run on from its latest '
        'checkpoint: the next epoch that beats its best validation accuracy saves a new best')
  if found is None:
    raise errors.WorkdirError(
        f'no best checkpoint in {folder}; train first: '
        f'python main.py --config=configs/optimal.py --workdir={workdir}')
  return found[1]


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
  write_json(os.path.join(workdir, 'config.json'), {**config.to_dict(), 'version': __version__})


def check_version(workdir: str) -> None:
  """Refuses, untouched, a workdir whose config.json another version's format wrote (0.1.x)."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path) and 'version' not in read_json(path):
    raise errors.WorkdirError(
        f'{workdir} was written by version 0.1.x of this code, whose checkpoints version '
        f'{__version__} does not read; it is left as it is. Train into a new --workdir, or use '
        'version 0.1 for this one (CHANGELOG.md says how)')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config.json laid over the defaults (a field added to the code after the run
  was trained takes its default)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise errors.WorkdirError(f'{path} not found: is {workdir!r} the workdir of a training run?')
  check_version(workdir)
  saved = read_json(path)
  saved.pop('version')
  saved['guided_bp_channels'] = tuple(saved.get('guided_bp_channels', ()))  # JSON gives a list
  config = config_lib.default_config()
  config.update(saved)
  return config
