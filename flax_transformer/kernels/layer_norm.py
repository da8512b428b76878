"""Layer normalisation over the last axis, statistics in float32.

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, *,
               epsilon: float = 1e-6) -> jnp.ndarray:
    """x: [..., D]; scale, bias: [D]  ->  [..., D] in x.dtype (mean and variance in float32)."""
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or not epsilon > 0:
        raise ValueError(f"layer_norm: epsilon must be a float > 0, got {epsilon!r}")
    if np.shape(scale) != x.shape[-1:] or np.shape(bias) != x.shape[-1:]:
        raise ValueError(f"layer_norm: scale and bias must be [D={x.shape[-1]}] for x of "
                         f"shape {x.shape}, got {np.shape(scale)} and {np.shape(bias)}")
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return (centred * inv_std * scale + bias).astype(x.dtype)
