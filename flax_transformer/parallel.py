"""A batch's rows split over several local devices, the model's state copied to each: what
data parallel training (`training/parallel.py`) and decoding on several devices share."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ROWS = "rows"  # the mesh axis that a batch's rows are split over


class RowSplit:
    """Shardings over a 1-D mesh of `devices`: `rows` splits an array's first axis into n
    equal parts, one per device; `replicated` puts a whole copy on each.

    `jit(run, row_args)` compiles a function (a decoder) that each device runs on its own
    rows with no communication (`jax.shard_map`; a `while_loop` inside stops on each device
    when its rows are done), so its outputs are one device's up to float rounding. `put`
    pads a batch that n does not divide with copies of its first row; the caller drops their
    outputs. Use `RowSplit.of(devices)`, which checks `devices`."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.array(self.devices), (ROWS,))
        self.rows = NamedSharding(self.mesh, PartitionSpec(ROWS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @staticmethod
    def of(devices) -> RowSplit | None:
        """None for None (run on the default device); a RowSplit as it is; else the split of
        a non-empty sequence of distinct `jax.Device`s (ValueError naming `devices`)."""
        if devices is None or isinstance(devices, RowSplit):
            return devices
        fix = "pass a list of jax devices, e.g. devices=jax.local_devices(), or None"
        if (isinstance(devices, str) or not isinstance(devices, Sequence) or not devices
                or not all(isinstance(d, jax.Device) for d in devices)):
            raise ValueError(f"devices must be a non-empty sequence of jax devices, got "
                             f"{devices!r}; {fix}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices lists a device twice: {list(devices)}; list each once")
        return RowSplit(devices)

    @property
    def size(self) -> int:
        return len(self.devices)

    def jit(self, run: Callable, row_args: Sequence[int]) -> Callable:
        """`run` jitted, each device running it on its rows of the arguments at positions
        `row_args` and on the whole of the others; every output is the devices' rows joined
        in order."""
        specs = tuple(PartitionSpec(ROWS) if i in row_args else PartitionSpec()
                      for i in range(len(inspect.signature(run).parameters)))
        return jax.jit(jax.shard_map(run, mesh=self.mesh, in_specs=specs,
                                     out_specs=PartitionSpec(ROWS), check_vma=False))

    def pad(self, rows: np.ndarray) -> np.ndarray:
        """`rows` [B, ...] with copies of row 0 appended up to a multiple of the device count."""
        extra = -rows.shape[0] % self.size
        return rows if not extra else np.concatenate([rows, np.repeat(rows[:1], extra, 0)])

    def replicate(self, tree: Any) -> Any:
        """`tree`'s arrays copied to every device (no copy for those already there)."""
        return jax.device_put(tree, self.replicated)

    def put(self, state: Any, *rows) -> tuple:
        """(`state` copied to every device, each of `rows` padded (`pad`) and split)."""
        return (self.replicate(state),
                *(jax.device_put(self.pad(np.asarray(r)), self.rows) for r in rows))

    # Splits over the same devices are equal: the decoders' compile caches key on them.
    def __eq__(self, other) -> bool:
        return isinstance(other, RowSplit) and self.devices == other.devices

    def __hash__(self) -> int:
        return hash(self.devices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size} x {self.devices[0].platform})"
