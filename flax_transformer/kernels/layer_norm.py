"""Layer normalisation over the last axis, statistics in float32.

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, *,
               epsilon: float = 1e-6) -> jnp.ndarray:
    """x: [..., D]; scale, bias: [D]  ->  [..., D] in x.dtype (mean and variance in float32)."""
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon > 0:
        raise ValueError(f"layer_norm: epsilon must be a float > 0, got {epsilon!r}")
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return (centred * inv_std * scale + bias).astype(x.dtype)
