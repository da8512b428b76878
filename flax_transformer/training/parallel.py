"""Data parallelism over the local devices: each batch split by rows, the state replicated.

A train step compiled with these shardings is partitioned by XLA (GSPMD): every device runs
the forward and backward pass on its rows of the batch, the gradients are summed across the
devices by an all-reduce, and every device applies the same optimizer update to its copy of
the state. The batches, their order and the dropout masks (a hash of each element's global
index, `kernels/dropout.py`) do not depend on the device count, so a run on N devices
computes what a run on one does, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from ..parallel import RowSplit


class DataParallel(RowSplit):
    """Shardings over a 1-D mesh of `devices` (`RowSplit`): `replicated` for the train state,
    `rows` for the batch arrays ([B, L], B split into len(devices) equal parts). Evaluation
    decodes on the same devices, each its share of the rows (`RowSplit.jit`)."""

    def shard(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The batch's [B, L] arrays split by rows: each device receives only its B / size."""
        return {name: jax.device_put(array, self.rows) for name, array in batch.items()}


def data_parallel(devices: int, batch_size: int) -> DataParallel | None:
    """The data parallelism of a run asking for `devices` (0: as many local devices as divide
    `batch_size`), None for one device. Raises ValueError naming the field and the fix for a
    count the machine does not have or that does not divide `batch_size`, and for a
    multi-process run (each process would train alone)."""
    if jax.process_count() > 1:
        raise ValueError(f"this run spans {jax.process_count()} processes; training is data "
                         "parallel over one process's local devices only: start one process")
    local = _local_devices(devices, "0: all that divide the batch")
    if devices == 0:
        devices = max(n for n in range(1, len(local) + 1) if batch_size % n == 0)
    elif batch_size % devices:
        raise ValueError(f"batch_size={batch_size} does not split into devices={devices} equal "
                         "parts; make --batch-size a multiple of --devices (or pass --devices "
                         "0 to use as many devices as divide it)")
    return None if devices == 1 else DataParallel(local[:devices])


def decoding_devices(devices: int) -> RowSplit | None:
    """The local devices that evaluating or predicting with a finished run decodes on, each
    its share of every batch's rows: `devices` of them (0: all), None for one. ValueError for
    a count the machine does not have."""
    chosen = _local_devices(devices, "0: all of them")[: devices or None]
    return None if len(chosen) == 1 else RowSplit.of(chosen)


def _local_devices(devices: int, zero: str) -> list[jax.Device]:
    local = jax.local_devices()
    if devices > len(local):
        raise ValueError(f"devices={devices} but this machine has {len(local)} "
                         f"{local[0].platform} device(s); pass --devices {len(local)} or fewer "
                         f"({zero})")
    return local
