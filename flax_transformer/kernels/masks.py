"""Boolean attention masks. Convention: True = the query may attend to the key.

Masks are built in the 4-D form that `multi_head_attention` broadcasts against the attention
matrix `[B, H, Tq, Tk]`: 4-D, each axis 1 or full (a padding mask is [B, 1, 1, Tk]).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def causal_mask(length: int, key_length: int | None = None) -> jnp.ndarray:
    """Lower-triangular mask `[1, 1, T, Tk]`: query i may attend to keys j <= i.

    With `key_length` > `length` the queries are the *last* `length` positions of the key
    sequence (as when decoding with a cache), so query i attends to keys j <= i + Tk - T.
    """
    key_length = length if key_length is None else key_length
    for name, value in (("length", length), ("key_length", key_length)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise ValueError(f"causal_mask: {name} must be an int, got {value!r}")
    if length < 1 or key_length < length:
        raise ValueError(
            f"causal_mask: need 1 <= length <= key_length, got length={length}, "
            f"key_length={key_length}"
        )
    offset = key_length - length
    q = np.arange(length)[:, None] + offset
    k = np.arange(key_length)[None, :]
    return jnp.asarray((k <= q)[None, None])


def padding_mask(tokens: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
    """Key padding mask `[B, 1, 1, T]` from token ids `[B, T]`: True where `tokens != pad_id`."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"padding_mask: tokens must be [batch, length], got shape {tokens.shape}")
    return (tokens != pad_id)[:, None, None, :]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    """Logical AND of the given masks (None entries are skipped); None if all are None."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def check_mask(mask, target: tuple[int, ...]) -> None:
    """Raise ValueError unless `mask` is boolean and its shape broadcasts to `target`."""
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        raise ValueError(f"mask must be a boolean array (True = may attend), got "
                         f"{type(mask).__name__}; pass jnp.asarray(mask, bool)")
    if mask.dtype != bool:
        raise ValueError(
            f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
            "pass mask.astype(bool)"
        )
    check_mask_shape(tuple(mask.shape), target)


def check_mask_shape(mask_shape: tuple[int, ...], target: tuple[int, ...]) -> None:
    """Raise ValueError unless `mask_shape` broadcasts to `target`: (B, H, Tq, Tk), or (Tq, Tk)
    for one head."""
    names = ("batch", "heads", "query length", "key length")[-len(target):]
    if len(mask_shape) != len(target):
        if len(target) == 2:
            raise ValueError(
                f"mask must be 2-D [query_len|1, key_len|1] for one head, got shape {mask_shape}"
            )
        raise ValueError(
            f"mask must be 4-D [batch|1, heads|1, query_len|1, key_len|1], got shape "
            f"{mask_shape}; "
            "use padding_mask()/causal_mask() to build one"
        )
    for dim, want, name in zip(mask_shape, target, names):
        if dim not in (1, want):
            raise ValueError(
                f"mask shape {mask_shape} does not broadcast to attention shape {target}: "
                f"{name} is {dim}, expected 1 or {want}"
            )


def check_causal_lengths(query_length: int, key_length: int) -> None:
    """Raise ValueError unless a causal mask fits: query_length <= key_length (the queries are
    the last `query_length` key positions, see `causal_mask`)."""
    if query_length > key_length:
        raise ValueError(
            f"causal=True needs query length <= key length (queries are the last positions of "
            f"the keys), got query length {query_length} and key length {key_length}; "
            "pass causal=False (e.g. for cross-attention) or give at least as many keys"
        )


def check_floating(**arrays) -> None:
    """ValueError naming the first of `arrays` whose dtype is not floating point."""
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}; cast "
                             f"it, e.g. {name}.astype(jnp.float32)")
