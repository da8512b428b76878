"""Scaled dot-product attention: one head, then many heads.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Layout follows `jax.nn.dot_product_attention`: q [B, Tq, H, Dk], k [B, Tk, H, Dk],
v [B, Tk, H, Dv]. Masks are boolean, True = may attend: [Tq, Tk] for one head,
[B|1, H|1, Tq|1, Tk|1] for `multi_head_attention` (4-D; each axis 1 or full).
Scores and softmax are computed in float32 whatever the input dtype; a query whose keys are
all masked returns zeros, never NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .dense import dense_attention
from .masks import causal_mask, check_causal_lengths, check_floating, check_mask, combine_masks

IMPLEMENTATIONS = ("vmap", "xla", "dense", "blockwise")


def single_head_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jnp.ndarray:
    """One attention head, exactly as in the paper.

    q: [Tq, Dk], k: [Tk, Dk], v: [Tk, Dv], mask: [Tq, Tk] bool (True = attend) -> [Tq, Dv]

    scores = q k^T / sqrt(Dk); masked scores are excluded; softmax over keys (float32);
    optional dropout on the attention weights; output = weights v.
    """
    check_single_head_inputs(q, k, v, mask, dropout_rate, dropout_rng)
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 when inputs are
    scores = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(acc).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        # A fully masked row would otherwise be uniform; zero it (and masked entries).
        weights = jnp.where(mask, weights, 0.0)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("qk,kd->qd", weights.astype(v.dtype), v, preferred_element_type=acc)
    return out.astype(q.dtype)


def cache_layout(k: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """k, v [B, T, H, D] -> the decoding-cache layouts of `cached_attention`:
    keys [B*H, Dk, T], values [B*H, T, Dv]"""
    batch, length, heads, head_dim = k.shape
    key = k.transpose(0, 2, 3, 1).reshape(batch * heads, head_dim, length)
    value = v.transpose(0, 2, 1, 3).reshape(batch * heads, length, v.shape[-1])
    return key, value


def cached_attention(
    q: jnp.ndarray, key_cache: jnp.ndarray, value_cache: jnp.ndarray,
    mask: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Attention of a few new queries over a decoding cache kept in matmul-ready layouts.

    q: [B, Tq, H, Dk]; key_cache: [B*H, Dk, Tk] (K^T of each (batch, head) pair);
    value_cache: [B*H, Tk, Dv]; mask: bool broadcastable to [B, H, Tq, Tk]  ->  [B, Tq, H, Dv]

    Equals `multi_head_attention(q, k, v, mask)` for key_cache, value_cache =
    `cache_layout(k, v)`. These are exactly the
    operands of the two batched matmuls, so a decoding step updates the cache in place and
    reads it as is; with [B, Tk, H, D] (or even [B, H, ...]) caches XLA copies every layer's
    whole cache several times per step.
    """
    check_cache_inputs(q, key_cache, value_cache, mask)
    batch, tq, heads, dk = q.shape
    tk = key_cache.shape[-1]
    scale = 1.0 / math.sqrt(dk)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q = q.transpose(0, 2, 1, 3).reshape(batch * heads, tq, dk)
    scores = jnp.einsum("nqd,ndk->nqk", q, key_cache, preferred_element_type=acc) * scale
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, heads, tq, tk)).reshape(batch * heads, tq, tk)
        scores = jnp.where(mask, scores, jnp.finfo(acc).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # fully masked rows -> zeros
    out = jnp.einsum("nqk,nkd->nqd", weights.astype(value_cache.dtype), value_cache,
                     preferred_element_type=acc)
    return out.reshape(batch, heads, tq, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def _vmap_heads(q, k, v, mask, dropout_rate, dropout_rng):
    """`single_head_attention` vmapped over heads, then over the batch (the reference path)."""
    batch, _, heads, _ = q.shape
    rngs = None
    if dropout_rate > 0.0:
        rngs = jax.random.split(dropout_rng, (batch, heads))
    # Broadcast (size-1) mask axes are dropped and not vmapped, so they are never materialised.
    head_axis = batch_axis = None
    if mask is not None:
        head_axis = 0 if mask.shape[1] > 1 else None
        batch_axis = 0 if mask.shape[0] > 1 else None
        mask = mask if head_axis is not None else mask[:, 0]
        mask = mask if batch_axis is not None else mask[0]
    rng_axis = None if rngs is None else 0

    def head(qh, kh, vh, mh, rh):
        return single_head_attention(qh, kh, vh, mh, dropout_rate=dropout_rate, dropout_rng=rh)

    per_head = jax.vmap(head, in_axes=(1, 1, 1, head_axis, rng_axis), out_axes=1)
    per_example = jax.vmap(per_head, in_axes=(0, 0, 0, batch_axis, rng_axis))
    return per_example(q, k, v, mask, rngs)


def _xla(q, k, v, mask, causal):
    """`jax.nn.dot_product_attention`, with fully masked query rows set to zero."""
    common = jnp.result_type(q, k, v)  # jax.nn wants one dtype; the other paths promote
    out = jax.nn.dot_product_attention(q.astype(common), k.astype(common), v.astype(common),
                                       mask=mask, is_causal=causal).astype(q.dtype)
    if mask is None:
        return out  # causal alone never masks a whole row (query i always sees key 0)
    full = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]) if causal else None)
    row_valid = jnp.any(full, axis=-1)  # [B|1, H|1, Tq]
    return out * jnp.transpose(row_valid, (0, 2, 1))[..., None].astype(out.dtype)


def check_cache_inputs(q, key_cache, value_cache, mask) -> None:
    """Host-side validation of `cached_attention` arguments (static shapes only)."""
    check_floating(q=q, key_cache=key_cache, value_cache=value_cache)
    if q.ndim != 4 or key_cache.ndim != 3 or value_cache.ndim != 3:
        raise ValueError(
            f"cached_attention needs q [B, Tq, H, Dk], key_cache [B*H, Dk, Tk] and value_cache "
            f"[B*H, Tk, Dv], got {q.shape}, {key_cache.shape}, {value_cache.shape}; build the "
            "caches with cache_layout(k, v)"
        )
    batch, tq, heads, dk = q.shape
    rows, tk = batch * heads, key_cache.shape[2]
    if key_cache.shape[:2] != (rows, dk) or value_cache.shape[:2] != (rows, tk):
        raise ValueError(
            f"caches do not fit q {q.shape}: key_cache must be [{rows}, {dk}, Tk] and "
            f"value_cache [{rows}, Tk, Dv] with the same Tk, got {key_cache.shape} and "
            f"{value_cache.shape}; build them with cache_layout(k, v)"
        )
    if mask is not None:
        check_mask(mask, (batch, heads, tq, tk))


def check_dropout(dropout_rate: float, dropout_rng, implementation: str = "vmap") -> None:
    """Host-side validation of the attention-dropout arguments."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0:
        if implementation == "xla":
            raise ValueError(
                "implementation='xla' (jax.nn.dot_product_attention) has no attention dropout; "
                "use implementation='vmap' or set dropout_rate=0"
            )
        if implementation in ("dense", "blockwise"):
            raise ValueError(
                f"implementation={implementation!r} has no attention dropout; "
                "use implementation='vmap' or set dropout_rate=0"
            )
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng (a jax.random key)")


def check_single_head_inputs(q, k, v, mask, dropout_rate, dropout_rng) -> None:
    """Host-side validation of `single_head_attention` arguments (static shapes only, so it
    also holds per head inside the vmap of `multi_head_attention`)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be [length, head_dim] (one head), got {x.shape}; "
                "use multi_head_attention for [batch, length, heads, head_dim]"
            )
    check_floating(q=q, k=k, v=v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k head_dim differ: q {q.shape}, k {k.shape}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v lengths differ: k {k.shape}, v {v.shape}")
    if mask is not None:
        check_mask(mask, (q.shape[0], k.shape[0]))
    check_dropout(dropout_rate, dropout_rng)


def check_attention_inputs(q, k, v, mask, implementation, dropout_rate, dropout_rng,
                           causal: bool = False) -> None:
    """Host-side validation of `multi_head_attention` arguments (shapes only, no compute)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not known; choose one of {IMPLEMENTATIONS}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, length, heads, head_dim], got {x.shape}")
    check_floating(q=q, k=k, v=v)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"head counts differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: q {q.shape}, k {k.shape}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v lengths differ: k {k.shape}, v {v.shape}")
    if implementation == "xla" and v.shape[3] != k.shape[3]:
        raise ValueError(
            f"implementation='xla' needs v head_dim == k head_dim, got k {k.shape}, v {v.shape}; "
            "use implementation='vmap'"
        )
    if mask is not None:
        check_mask(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    if causal:
        check_causal_lengths(q.shape[1], k.shape[1])
    check_dropout(dropout_rate, dropout_rng, implementation)


def multi_head_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    causal: bool = False,
    implementation: str = "vmap",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    block_size: int | tuple[int, int] = 512,
) -> jnp.ndarray:
    """Attention in every head independently.

    q: [B, Tq, H, Dk], k: [B, Tk, H, Dk], v: [B, Tk, H, Dv],
    mask: bool, 4-D, each axis 1 or full: [B|1, H|1, Tq|1, Tk|1] (True = attend), or None
    ->  [B, Tq, H, Dv]

    causal: also apply `causal_mask(Tq, Tk)` (query i attends keys j <= i + Tk - Tq).
    implementation:
      "vmap"      `single_head_attention` vmapped over heads and batch (the reference);
      "xla"       `jax.nn.dot_product_attention` (no attention dropout; its scores are
                  float32 even for float64 inputs);
      "dense"     the full score matrix with a hand-written backward pass (kernels/dense.py),
                  the fastest for short sequences on CPU (no attention dropout);
      "blockwise" online softmax over query/key blocks, memory O(T) per head; `block_size` is
                  an int b (tiles of b queries x b/2 keys) or a (query, key) pair.
    "dense" and "blockwise" define their backward pass (`jax.custom_vjp`): reverse mode
    (`jax.grad`, `jax.vjp`) only; forward mode (`jax.jvp`, `jax.jacfwd`) and, for
    "blockwise", second derivatives need "vmap" or "xla".
    """
    check_attention_inputs(q, k, v, mask, implementation, dropout_rate, dropout_rng, causal)
    if q.shape[1] == 0 or k.shape[1] == 0:  # no queries, or no keys to attend: zeros
        return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)
    if implementation == "xla":
        if causal and q.shape[1] != k.shape[1]:
            # jax.nn aligns the causal mask top-left; ours aligns it to the end (decoding).
            mask, causal = combine_masks(mask, causal_mask(q.shape[1], k.shape[1])), False
        return _xla(q, k, v, mask, causal)
    if implementation == "dense":
        return dense_attention(q, k, v, mask, causal=causal)
    if implementation == "blockwise":
        from .blockwise import blockwise_attention

        return blockwise_attention(q, k, v, mask, causal=causal, block_size=block_size)
    if causal:
        mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]))
    return _vmap_heads(q, k, v, mask, dropout_rate, dropout_rng)
