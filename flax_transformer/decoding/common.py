"""What every decoder shares: host-side argument checks, the eval-mode split of the model,
the tokens a decoder may never emit, and trimming of the padded output on the host."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..nn import BOS_ID, PAD_ID, Transformer, check_tokens

NEG_INF = -jnp.inf


def check_model(model) -> None:
    """ValueError unless `model` is a flax_transformer `Transformer`."""
    if not isinstance(model, Transformer):
        raise ValueError(
            f"model must be a flax_transformer Transformer, got {type(model).__name__}"
        )


def check_max_len(model: Transformer, max_len) -> int:
    """`max_len` counts generated tokens: an int in [1, model.config.max_len]."""
    limit = model.config.max_len
    if not isinstance(max_len, numbers.Integral) or isinstance(max_len, bool):
        raise ValueError(f"max_len must be an integer number of tokens, got {max_len!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 (tokens to generate), got {max_len}")
    if max_len > limit:
        raise ValueError(
            f"max_len={max_len} exceeds TransformerConfig.max_len={limit} (the decoder has "
            f"positions 0..{limit - 1}); pass max_len <= {limit} or build the model with a "
            "larger max_len"
        )
    return int(max_len)


def check_row_max_len(row_max_len, rows: int, max_len: int) -> np.ndarray:
    """Per-row caps on the generated tokens -> int32 [rows]: `row_max_len` (one integer in
    [1, max_len] per source row), or max_len for every row when it is None."""
    if row_max_len is None:
        return np.full((rows,), max_len, np.int32)
    if isinstance(row_max_len, jax.core.Tracer):
        raise ValueError("row_max_len is traced; pass concrete per-row lengths")
    limits = np.asarray(row_max_len)
    if limits.shape != (rows,) or not np.issubdtype(limits.dtype, np.integer):
        raise ValueError(f"row_max_len must hold one integer per source row ({rows}), got "
                         f"shape {limits.shape} and dtype {limits.dtype}")
    if rows and (limits.min() < 1 or limits.max() > max_len):
        raise ValueError(f"row_max_len must be in [1, max_len={max_len}], got values in "
                         f"[{limits.min()}, {limits.max()}]; raise max_len or lower them")
    return limits.astype(np.int32)


def check_positive_int(value, name: str, fix: str) -> int:
    """`value` as an int; ValueError (ending in `fix`) unless an integer >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {fix}")
    return int(value)


def check_bool(value, name: str) -> bool:
    """`value` as a bool; ValueError for anything but True/False (e.g. "no", None, 1)."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_real(value, name: str) -> float:
    """`value` as a float; ValueError unless a finite real number."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def prepare_source(model: Transformer, src_tokens) -> jax.Array:
    """Check `src_tokens` [B, S] on the host (shape, dtype, id range, length) -> int32 array."""
    if isinstance(src_tokens, jax.core.Tracer):
        raise ValueError("src_tokens is traced (a call inside jax.jit or a transformation): "
                         "decoding compiles its own loop and returns NumPy arrays; call it "
                         "outside jit")
    if not hasattr(src_tokens, "shape"):
        src_tokens = np.asarray(src_tokens)
    check_tokens(src_tokens, model.config.src_vocab_size, model.config.max_len, "src_tokens")
    return jnp.asarray(src_tokens, jnp.int32)


def split_model(model: Transformer):
    """(graphdef, state) of `model` in the mode decoding runs it (eval, no remat): the hashable
    graphdef keys the compile caches, the state is the jitted loop's argument. A model left
    in train mode thus shares the compiled loop of the same model in eval mode. (The view,
    a copy of the module graph, is made only when a mode differs: ~30 ms at `base`, where
    looking costs under 1 ms.)"""
    off_mode = any(getattr(module, "deterministic", True) is False
                   or getattr(module, "remat", False) for _, module in nnx.iter_modules(model))
    return nnx.split(nnx.view(model, deterministic=True, remat=False) if off_mode else model)


def merge_for_decoding(graphdef, state) -> Transformer:
    """Inside the jitted loop: the model in eval mode (dropout off) without remat (nothing
    is differentiated). `nnx.view` changes only the traced copy, so the caller's model keeps
    its modes."""
    return nnx.view(nnx.merge(graphdef, state), deterministic=True, remat=False)


def suppress_special(logits: jax.Array) -> jax.Array:
    """Pad and bos are never generated: their logits become -inf. logits: [..., V]"""
    return logits.at[..., PAD_ID].set(NEG_INF).at[..., BOS_ID].set(NEG_INF)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (first maximum; first NaN if any) as two plain reductions.

    x: [..., V] -> int32 [...]. XLA:CPU runs argmax's (value, index) reduction ~6x slower
    than a max followed by a min over the matching indices.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def trim(tokens: np.ndarray) -> np.ndarray:
    """Drop trailing columns that are padding in every row ([..., L] -> [..., L'], L' >= 1)."""
    tokens = np.asarray(tokens)
    used = np.any(tokens.reshape(-1, tokens.shape[-1]) != PAD_ID, axis=0)
    length = int(np.max(np.nonzero(used)[0]) + 1) if used.any() else 1
    return tokens[..., :length]
