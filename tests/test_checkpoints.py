"""Checkpoints: retention, a damaged newest step moved aside, a damaged best, a full disk."""

import os
import pathlib
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn import checkpoints
from cnn import errors

# A failed restore leaves Orbax's reads of the other arrays unawaited; checkpoints.py silences
# those it collects, and one may still be collected later, in another test.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

class State(flax.struct.PyTreeNode):
  """Shaped like train.TrainState: a static field, an optimizer state, an optional None field."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  name: str = flax.struct.field(pytree_node=False, default='tiny')


def _state(step: int, size: int = 32) -> State:
  rng = np.random.default_rng(step)  # random values: zstd stores them as they are
  params = {'w': jnp.asarray(rng.normal(size=(size, size)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=size), jnp.float32)}
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  return State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params))


def _assert_equal(a: Any, b: Any) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(workdir: pathlib.Path, steps, keep: int = 3) -> None:
  for step in steps:
    checkpoints.save_latest(str(workdir), _state(step), {'step': step}, keep=keep)


def _steps(workdir: pathlib.Path, which: str = 'latest') -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints' / which).iterdir())


def _biggest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file of the step (OCDBT keeps data under .../d/)."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: pathlib.Path) -> None:
  path = _biggest_data_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _flip_byte(step_dir: pathlib.Path) -> None:
  path = _biggest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(data)


def _delete(step_dir: pathlib.Path) -> None:
  _biggest_data_file(step_dir).unlink()


CORRUPTIONS = {'truncate': _truncate, 'flip_byte': _flip_byte, 'delete': _delete}


def test_keeps_the_newest_steps(tmp_path):
  _save_steps(tmp_path, [1, 2, 3, 4])
  assert _steps(tmp_path) == [2, 3, 4]
  state, meta = checkpoints.restore_latest(str(tmp_path), _state(0))
  _assert_equal(state, _state(4))
  assert meta == {'step': 4} and state.name == 'tiny' and state.ema_params is None


def test_no_checkpoint_restores_none(tmp_path):
  assert checkpoints.restore_latest(str(tmp_path), _state(0)) is None
  assert not (tmp_path / 'checkpoints').exists()  # a restore creates no folders


def test_the_same_step_again_replaces_it(tmp_path):
  _save_steps(tmp_path, [1, 2])
  checkpoints.save_latest(str(tmp_path), _state(2), {'step': 2, 'again': True})
  assert _steps(tmp_path) == [1, 2]
  assert checkpoints.restore_latest(str(tmp_path), _state(0))[1] == {'step': 2, 'again': True}


@pytest.mark.parametrize('corrupt', CORRUPTIONS)
def test_a_damaged_newest_step_is_moved_aside(tmp_path, capsys, corrupt):
  _save_steps(tmp_path, [1, 2, 3])
  CORRUPTIONS[corrupt](tmp_path / 'checkpoints' / 'latest' / '3')
  state, meta = checkpoints.restore_latest(str(tmp_path), _state(0))
  _assert_equal(state, _state(2))
  assert meta == {'step': 2}
  folder, dest = tmp_path / 'checkpoints' / 'latest', tmp_path / 'checkpoints' / 'unreadable'
  line = capsys.readouterr().out.strip()
  assert re.fullmatch(rf'checkpoint at step 3 in {folder} is unreadable \(.+\); moved to '
                      rf'{dest / "latest-3"}; resuming from step 2', line), line
  if corrupt == 'flip_byte':
    assert 'checksum' in line  # the files read; the values are wrong
  assert _steps(tmp_path) == [1, 2]
  assert (dest / 'latest-3' / 'state').is_dir()  # moved, never deleted


def test_retention_after_a_damaged_step_keeps_the_good_ones(tmp_path):
  _save_steps(tmp_path, [1, 2, 3])
  _flip_byte(tmp_path / 'checkpoints' / 'latest' / '3')
  checkpoints.restore_latest(str(tmp_path), _state(0))  # moves step 3 aside, resumes from 2
  _save_steps(tmp_path, [3, 4])
  assert _steps(tmp_path) == [2, 3, 4]
  for step in (4, 3, 2):  # each kept step reads: damage the newest to reach the next
    state, _ = checkpoints.restore_latest(str(tmp_path), _state(0))
    _assert_equal(state, _state(step))
    _delete(tmp_path / 'checkpoints' / 'latest' / str(step))


def test_all_steps_damaged_raises_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _truncate(tmp_path / 'checkpoints' / 'latest' / '1')
  _flip_byte(tmp_path / 'checkpoints' / 'latest' / '2')
  with pytest.raises(errors.WorkdirError, match='new --workdir') as e:
    checkpoints.restore_latest(str(tmp_path), _state(0))
  assert str(tmp_path / 'checkpoints' / 'latest') in str(e.value)
  assert _steps(tmp_path) == [1, 2]


def test_best_round_trip_as_numpy(tmp_path):
  variables = {'params': {'w': np.arange(6.0).reshape(2, 3)}, 'batch_stats': {}}
  checkpoints.save_best(str(tmp_path), 5, {'params': {'w': np.zeros((2, 3))}}, {'epoch': 1})
  checkpoints.save_best(str(tmp_path), 9, variables, {'epoch': 2})
  restored, meta = checkpoints.restore_best(str(tmp_path))
  assert _steps(tmp_path, 'best') == [9] and meta == {'epoch': 2}
  assert isinstance(restored['params']['w'], np.ndarray)
  np.testing.assert_array_equal(restored['params']['w'], variables['params']['w'])


def test_no_best_or_a_damaged_best_raises(tmp_path):
  with pytest.raises(errors.WorkdirError, match='no best checkpoint'):
    checkpoints.restore_best(str(tmp_path))
  checkpoints.save_best(str(tmp_path), 5, {'params': jax.device_get(_state(5).params)}, {})
  folder = tmp_path / 'checkpoints' / 'best'
  _flip_byte(folder / '5')
  with pytest.raises(errors.WorkdirError, match='new --workdir') as e:
    checkpoints.restore_best(str(tmp_path))
  assert str(folder) in str(e.value) and 'unreadable' in str(e.value)


def test_a_full_disk_keeps_the_last_good_step(small_disk):
  if small_disk is None:
    return  # it ran, and passed, in a user namespace of its own (the fixture says why)
  disk = small_disk.path
  workdir, folder = disk / 'run', disk / 'run' / 'checkpoints' / 'latest'
  _save_steps(workdir, [1])
  with pytest.raises(errors.DiskFullError) as e:  # 2 x 4 MiB of weights and Adam moments
    checkpoints.save_latest(str(workdir), _state(2, size=1024), {'step': 2})
  assert str(folder) in str(e.value) and 'MiB free' in str(e.value), str(e.value)
  assert 'the last good checkpoint (step 1) is kept' in str(e.value)
  state, meta = checkpoints.restore_latest(str(workdir), _state(0))
  _assert_equal(state, _state(1))
  assert not list(disk.rglob('*orbax-checkpoint-tmp*'))
  _save_steps(workdir, [2])
  assert _steps(workdir) == [1, 2] and not list(disk.rglob('*orbax-checkpoint-tmp*'))
