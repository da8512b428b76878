"""Data parallelism over the local devices: each batch split by rows, the state replicated.

A train step compiled with these shardings is partitioned by XLA (GSPMD): every device runs
the forward and backward pass on its rows of the batch, the gradients are summed across the
devices by an all-reduce, and every device applies the same optimizer update to its copy of
the state. The batches, their order and the dropout masks (a hash of each element's global
index, `kernels/dropout.py`) do not depend on the device count, so a run on N devices
computes what a run on one does, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"  # the mesh axis that the batch rows are split over


class DataParallel:
    """Shardings over a 1-D mesh of `devices`: `replicated` for the train state, `rows` for
    the batch arrays ([B, L], B split into len(devices) equal parts)."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def size(self) -> int:
        return len(self.devices)

    def replicate(self, tree: Any) -> Any:
        """`tree`'s arrays copied to every device of the mesh."""
        return jax.device_put(tree, self.replicated)

    def shard(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The batch's [B, L] arrays split by rows: each device receives only its B / size."""
        return {name: jax.device_put(array, self.rows) for name, array in batch.items()}

    def first_copy(self, tree: Any) -> Any:
        """`tree` on the first device alone (evaluation runs there, not once per device)."""
        return jax.device_put(tree, self.devices[0])

    def __repr__(self) -> str:
        return f"DataParallel({self.size} x {self.devices[0].platform})"


def data_parallel(devices: int, batch_size: int) -> DataParallel | None:
    """The data parallelism of a run asking for `devices` (0: as many local devices as divide
    `batch_size`), None for one device. Raises ValueError naming the field and the fix for a
    count the machine does not have or that does not divide `batch_size`, and for a
    multi-process run (each process would train alone)."""
    if jax.process_count() > 1:
        raise ValueError(f"this run spans {jax.process_count()} processes; training is data "
                         "parallel over one process's local devices only: start one process")
    local = jax.local_devices()
    if devices == 0:
        devices = max(n for n in range(1, len(local) + 1) if batch_size % n == 0)
    elif devices > len(local):
        raise ValueError(f"devices={devices} but this machine has {len(local)} "
                         f"{local[0].platform} device(s); pass --devices {len(local)} or fewer "
                         "(0: all that divide the batch)")
    elif batch_size % devices:
        raise ValueError(f"batch_size={batch_size} does not split into devices={devices} equal "
                         "parts; make --batch-size a multiple of --devices (or pass --devices "
                         "0 to use as many devices as divide it)")
    return None if devices == 1 else DataParallel(local[:devices])
