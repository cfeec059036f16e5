"""Data parallelism with jax.sharding: one mesh axis 'data' over every device of every host.

The global batch is split along 'data'; parameters and optimizer state are
replicated; XLA's SPMD partitioner inserts the gradient all-reduce. Several
hosts join through `jax.distributed.initialize` (config.distributed or the
environment); every host then runs the same program on the global mesh.
With one device, the mesh has one device and nothing changes.
"""

from __future__ import annotations

import os

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ddpm_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(distributed_config) -> None:
    """Joins a multi-host run when one is configured (config or JAX_COORDINATOR_ADDRESS, ...);
    must run before anything touches a device. A no-op for a single process."""
    address = distributed_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        return
    num = distributed_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = distributed_config.process_id if distributed_config.process_id >= 0 else int(
        os.environ.get("JAX_PROCESS_ID", "-1"))
    if num < 1 or pid < 0:
        raise UserError("a multi-host run needs --config.distributed.num_processes and "
                        "--config.distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID) "
                        f"besides the coordinator address {address}")
    # CPU hosts exchange gradients through gloo (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "--config.train.batch_size") -> None:
    if batch_size % mesh.size:
        raise UserError(f"{what} ({batch_size}) must be a multiple of the number of devices ({mesh.size})")
