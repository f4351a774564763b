"""Multi-host runs with JAX's own multi-controller runtime: one process per host, `jax.distributed`.

    initialize(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=2)   # or from the environment
    mine = [line for i, line in enumerate(lines) if i % process_count() == process_index()]
    value = broadcast(value)    # process 0's value, everywhere: host-side decisions that must agree
    barrier("job-done")

A model too large for one host is served by a mesh over several hosts' devices: `replica(mesh_size)` groups
consecutive processes into replicas; the processes of a replica run the same requests in lockstep (every
host-side decision is then the same), and replicas split the work as single hosts do.

On TPU pods and SLURM/Open MPI clusters `jax.distributed.initialize()` finds the coordinator itself; elsewhere
(CPU processes on one machine, as the tests run) pass the address, count and index, by flags or the environment
variables QWENJAX_COORDINATOR_ADDRESS, QWENJAX_NUM_PROCESSES, QWENJAX_PROCESS_ID. CPU collectives go through gloo.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from qwenjax import _files
from qwenjax._errors import ConfigError

_ENV = ("QWENJAX_COORDINATOR_ADDRESS", "QWENJAX_NUM_PROCESSES", "QWENJAX_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the job's processes. Arguments default to the QWENJAX_* environment variables. Returns False (and
  does nothing) for a single-process run: no address and no process count above one."""
  coordinator_address = coordinator_address or os.environ.get(_ENV[0]) or None
  try:
    if num_processes is None and os.environ.get(_ENV[1]):
      num_processes = int(os.environ[_ENV[1]])
    if process_id is None and os.environ.get(_ENV[2]):
      process_id = int(os.environ[_ENV[2]])
  except ValueError as e:
    raise ConfigError(f"{_ENV[1]} / {_ENV[2]} must be integers ({e}).") from None
  if coordinator_address is None and (num_processes or 1) <= 1:
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id {process_id} is outside [0, {num_processes}).")
  # Cross-process collectives of CPU devices (a no-op for TPU/GPU); must precede backend initialisation.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def broadcast(value: Any) -> Any:
  """Process 0's JSON-serialisable `value`, returned on every process (the others' values are ignored)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32))[0])
  buf = np.zeros(size, np.uint8)
  buf[:data.size] = data
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)
  return _files.loads(out.tobytes().decode())


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class Replica:
  """The processes that serve one copy of the model. A mesh larger than one host's devices spans several
  consecutive processes, which run the same requests in lockstep; replicas split the work between them.

  index, count: this replica and how many the job has. rank: this process within its replica (rank 0 writes the
  replica's results). devices: the replica's devices, every process's, in process order."""

  index: int
  count: int
  rank: int
  devices: tuple


def replica(mesh_size: int | None) -> Replica:
  """This process's replica for a mesh of `mesh_size` devices (None: one device of this process)."""
  local, processes, me = jax.local_device_count(), jax.process_count(), jax.process_index()
  if not mesh_size:
    return Replica(me, processes, 0, (jax.local_devices()[0],))
  if mesh_size <= local:
    if mesh_size != local:
      raise ConfigError(f"a mesh of {mesh_size} devices must use all {local} devices of this host (or span "
                        f"several hosts: a multiple of {local}).")
    return Replica(me, processes, 0, tuple(jax.local_devices()))
  hosts = mesh_size // local
  if mesh_size % local or processes % hosts:
    raise ConfigError(f"a mesh of {mesh_size} devices spans {mesh_size / local:g} hosts of {local} devices; it must "
                      f"be a whole number that divides the {processes} processes.")
  index = me // hosts
  members = range(index * hosts, (index + 1) * hosts)
  devices = sorted((d for d in jax.devices() if d.process_index in members), key=lambda d: (d.process_index, d.id))
  return Replica(index, processes // hosts, me % hosts, tuple(devices))
