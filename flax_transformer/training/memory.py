"""Pre-flight memory check: refuse a run whose training cannot fit, before allocating it.

The estimate is a lower bound (the least a train step must hold at once), so the check never
refuses a run that would fit.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from ..config import TransformerConfig
from ..nn import Transformer

GIB = 2**30


def num_parameters(config: TransformerConfig) -> int:
    """Parameters of `Transformer(config)`, counted from shapes alone (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def training_memory(config: TransformerConfig, *, batch_size: int, target_len: int,
                    accumulate_steps: int = 1) -> dict[str, int]:
    """Lower bound, in bytes, of what a train step holds at once, by part:

    - "state": float32 parameters, their gradients and Adam's two moments (16 bytes a
      parameter; 20 with gradient accumulation, which keeps a running sum);
    - "activations": what the backward pass needs, at the least: every layer's input
      [batch_size, target_len, d_model], one feed-forward hidden layer [.., d_ff] and, for the
      kernels that materialise it ("dense", "vmap"), one layer's attention weights
      [batch_size, num_heads, target_len, target_len] (2 bytes an element unless float32);
    - "logits": the float32 logits [batch_size, target_len, tgt_vocab_size] and their gradient;
    - "positions": the sinusoidal table of `max_len` rows that decoding builds (float64, then
      float32).
    """
    per_parameter = 16 + (4 if accumulate_steps > 1 else 0)
    width = 4 if config.dtype == "float32" else 2
    tokens = batch_size * target_len
    layers = config.num_encoder_layers + config.num_decoder_layers
    activations = tokens * (layers * config.d_model + config.d_ff)
    if config.attention_impl in ("dense", "vmap"):
        activations += tokens * config.num_heads * target_len
    return {
        "state": per_parameter * num_parameters(config),
        "activations": width * activations,
        "logits": 2 * 4 * tokens * config.tgt_vocab_size,
        "positions": 12 * config.max_len * config.d_model,
    }


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_memory(device: jax.Device | None = None) -> int | None:
    """Bytes `device` (default: the first) can still give a run, or None when unknown:
    an accelerator's allocator limit, or on CPU the host's available memory (MemAvailable, and
    the cgroup limit when lower)."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return None if limit is None else int(limit) - int(stats.get("bytes_in_use", 0))
    room = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():  # Linux; elsewhere unknown
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        room.append(cgroup)
    return min(room) if room else None


_PARTS = {  # part: (what it is, the flags that shrink it)
    "state": ("parameters, gradients and Adam moments",
              "--d-model, --d-ff or the layer counts (--num-encoder-layers, --num-decoder-layers)"),
    "activations": ("activations of one batch", "--batch-size (or --max-len, which caps the "
                    "sequence length)"),
    "logits": ("logits of one batch", "--batch-size (or the target vocabulary)"),
    "positions": ("positional table", "--max-len"),
}


def check_training_memory(config: TransformerConfig, *, batch_size: int, target_len: int,
                          accumulate_steps: int = 1, available: int | None = None) -> None:
    """ValueError naming the fields to lower when even `training_memory`'s lower bound exceeds
    `available` bytes (default: `available_memory()`); nothing when the memory is unknown."""
    available = available_memory() if available is None else available
    if available is None:
        return
    parts = training_memory(config, batch_size=batch_size, target_len=target_len,
                            accumulate_steps=accumulate_steps)
    need = sum(parts.values())
    if need <= available:
        return
    largest = max(parts, key=parts.get)
    shown = sorted((size, name) for name, size in parts.items() if size >= 0.05 * GIB)
    detail = ", ".join(f"{_PARTS[name][0]} {size / GIB:.1f} GiB" for size, name in shown[::-1])
    raise ValueError(
        f"training needs at least {need / GIB:.1f} GiB ({detail}) but "
        f"{available / GIB:.1f} GiB of memory is available; lower {_PARTS[largest][1]}"
    )
