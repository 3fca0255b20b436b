"""Where the train step's batches come from, and the device mesh they are split over.

Two feeds give the same batches in the same order (epoch `e` is the permutation of `(seed, e)`,
each batch's indices sorted): the host feed slices numpy arrays and copies each batch to the
devices; the device feed places the uint8 training set on the devices once and gathers each
batch there, so only a batch's indices cross from the host. On a GPU a step of this model takes
about a millisecond, and the copy and its Python work, not the GPU, would set the pace.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np


def make_mesh() -> Mesh:
  """All devices of all hosts on one 'data' axis: the batch is split, the state replicated."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def _process_share(n: int) -> slice:
  """This process's rows of a global batch of `n`."""
  per_process, i = n // jax.process_count(), jax.process_index()
  return slice(i * per_process, (i + 1) * per_process)


def _split(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> the global arrays split over the mesh."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global numpy batch -> arrays split over the mesh; each host contributes its own slice."""
  share = _process_share(len(next(iter(batch.values()))))
  return _split({k: v[share] for k, v in batch.items()}, mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


class HostFeed:
  """Slices the batch on the host and copies it to the devices."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh):
    self._images, self._labels, self._mesh = images, labels, mesh

  def __call__(self, idx: np.ndarray) -> dict[str, jax.Array]:
    """Gathers only this process's share of the global batch `idx`."""
    mine = idx[_process_share(len(idx))]
    return _split({'image': self._images[mine], 'label': self._labels[mine]}, self._mesh)


class DeviceFeed:
  """Holds the training set on every device and gathers each batch there."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh):
    self._images, self._labels = replicate((images, labels), mesh)
    self._mesh = mesh
    split = NamedSharding(mesh, P('data'))
    self._gather = jax.jit(lambda x, y, i: {'image': jnp.take(x, i, axis=0),
                                            'label': jnp.take(y, i, axis=0)},
                           out_shardings=split)

  def __call__(self, idx: np.ndarray) -> dict[str, jax.Array]:
    return self._gather(self._images, self._labels, replicate(idx.astype(np.int32), self._mesh))


def use_device_feed(mode: str, nbytes: int, max_fraction: float) -> bool:
  """'on', 'off', or 'auto': on a GPU/TPU when the set fits in max_fraction of its memory.

  On the CPU backend the host arrays already are device memory: the host feed's slice is the
  whole cost either way, so 'auto' keeps it there.
  """
  if mode != 'auto':
    return mode == 'on'
  limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')  # None on the CPU
  return (jax.default_backend() != 'cpu' and jax.process_count() == 1 and limit is not None
          and nbytes <= max_fraction * limit)
