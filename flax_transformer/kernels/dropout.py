"""Inverted dropout with 16-bit random draws.

    dropout(x) = x * m / (1 - rate),   m_i ~ Bernoulli(1 - rate)

Each 32-bit draw of the key's generator is split into two 16-bit uniforms, so a mask costs half
the random-number work of one draw per element, and the mask, scale and multiply compile to a
single elementwise loop. The rate is realised to within 2^-16 (round(rate * 65536) / 65536).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jnp.ndarray, rate: float, key: jax.Array | None) -> jnp.ndarray:
    """x: [...] -> [...]: each element zeroed with probability `rate`, survivors / (1 - rate)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0 or x.size == 0:
        return x
    if key is None:
        raise ValueError("dropout with rate > 0 needs a random key")
    threshold = round(rate * 65536)
    if x.size % 2:  # odd sizes: one 32-bit draw per element, its low 16 bits used
        uniform16 = jax.random.bits(key, x.shape, jnp.uint32) & 0xFFFF
    else:  # x viewed as [2, n/2]: row r uses bits r*16 .. r*16+15 of the same draw
        bits = jax.random.bits(key, (1, x.size // 2), jnp.uint32)
        shift = jnp.array([[0], [16]], jnp.uint32)
        uniform16 = ((bits >> shift) & 0xFFFF).reshape(x.shape)
    scale = jnp.where(uniform16 >= threshold, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
    return x * scale
