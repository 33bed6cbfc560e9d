"""Devices: multi-host init, the local mesh, replicated and sharded transfers.

The train step is a `jax.pmap` over the local devices (as the official
release). pmap compiles again on its second call unless its inputs arrive
already laid out one slice per device, so everything given to it goes through
`replicate` or `shard` below: `jax.device_put` with a `NamedSharding` over a
1-D mesh of the local devices whose axis is the pmap axis.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
import collections
import json
import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

AXIS = "batch"

def _cluster_has_many_processes() -> bool:
  """Whether the environment describes a multi-process job."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(name, "1") or "1") > 1:
      return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def wants_distributed(dist_config: Any) -> bool:
  """Reads `config.distributed.initialize` (True, False or 'auto')."""
  mode = dist_config.initialize
  if isinstance(mode, str) and mode.lower() in ("true", "false"):
    mode = mode.lower() == "true"  # A str field set from the command line.
  if isinstance(mode, bool):
    return mode
  if mode != "auto":
    raise ValueError(f"config.distributed.initialize={mode!r} is invalid; "
                     "allowed: True, False or 'auto'")
  return bool(dist_config.coordinator_address) or _cluster_has_many_processes()


def maybe_initialize_distributed(dist_config: Any) -> bool:
  """Starts `jax.distributed` when the config or the environment asks.

  Must run before anything touches a device. `initialize=True` or a
  `coordinator_address` starts it with the config's fields (None fields are
  auto-detected by JAX); 'auto' also starts it under SLURM/MPI with more
  than one task, on a multi-host TPU, or when `JAX_COORDINATOR_ADDRESS` is
  set (then `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` give the other fields).

  Returns:
    Whether jax.distributed was initialized.
  """
  if not wants_distributed(dist_config):
    return False
  env_int = lambda name: (int(os.environ[name]) if name in os.environ
                          else None)
  kwargs = dict(
      coordinator_address=(dist_config.coordinator_address
                           or os.environ.get("JAX_COORDINATOR_ADDRESS")),
      num_processes=(dist_config.num_processes
                     if dist_config.num_processes is not None
                     else env_int("JAX_NUM_PROCESSES")),
      process_id=(dist_config.process_id
                  if dist_config.process_id is not None
                  else env_int("JAX_PROCESS_ID")),
  )
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def local_mesh() -> Mesh:
  """A 1-D mesh over this process's devices, axis `AXIS`."""
  return Mesh(np.array(jax.local_devices()), (AXIS,))


def _leading_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a host tree to every local device: leaves get a leading axis."""
  n = mesh.devices.size
  sharding = _leading_sharding(mesh)
  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x[None], (n,) + x.shape), sharding)
  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree, as host NumPy arrays."""
  def get(x):
    # Index on the host (indexing a jax.Array compiles a squeeze per shape),
    # and copy: the device buffer may be donated to the next step while an
    # async checkpoint still writes this array.
    if isinstance(x, jax.Array):
      x = x.addressable_shards[0].data
    return np.array(np.asarray(x)[0], copy=True)
  return jax.tree.map(get, tree)


def shard(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Splits a host batch `[B, ...]` into `[devices, B / devices, ...]`."""
  n = mesh.devices.size
  sharding = _leading_sharding(mesh)
  def put(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"host batch of {x.shape[0]} does not split over "
                       f"{n} local devices")
    return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]),
                          sharding)
  return {k: put(v) for k, v in batch.items()}


def prefetch_to_device(iterator: Iterable[tuple[dict[str, np.ndarray], Any]],
                       mesh: Mesh, size: int = 2
                       ) -> Iterator[tuple[dict[str, jax.Array], Any]]:
  """Keeps `size` batches in flight to the devices.

  Args:
    iterator: yields `(host_batch, tag)`; the tag (e.g. the data position
      after this batch) is passed through untouched.
    mesh: from `local_mesh()`.
    size: batches transferred ahead of use (0 or 1: no look-ahead).

  Yields:
    `(device_batch, tag)` in order.
  """
  queue = collections.deque()
  iterator = iter(iterator)
  def enqueue(n):
    for _ in range(n):
      try:
        batch, tag = next(iterator)
      except StopIteration:
        return
      queue.append((shard(batch, mesh), tag))
  enqueue(max(size, 1))
  while queue:
    yield queue.popleft()
    enqueue(1)


def is_host0() -> bool:
  """Only process 0 writes logs and checkpoint metadata."""
  return jax.process_index() == 0


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serializable `obj`, in process order.

  Used for the data positions: each host reads its own shard, so each has
  its own position, and process 0 saves them all.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode())
          for row, n in zip(np.asarray(gathered), np.asarray(lengths))]
