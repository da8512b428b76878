"""Inverted dropout with 16-bit random draws from a keyed counter hash.

    dropout(x) = x * m / keep,   m_i ~ Bernoulli(keep),   keep = 1 - round(rate * 65536) / 65536

The random bits are a hash of each element's index, keyed by the 64 bits of the JAX key:

    h(i) = mix(mix(i * 0x9E3779B9 + k0) ^ k1 ^ 0x6A09E667)

where `mix` is a 32-bit avalanche function (xor-shifts and two odd multiplies) and (k0, k1)
the key's data (`jax.random.key_data`; longer keys are folded into two words first). For a
fixed key every step is a bijection of the 32-bit words, so distinct indices never share a
draw. It costs ~12 integer operations per 32-bit draw; the key's own generator
(Threefry-2x32) took 7x as long for the same bits on a 2-core CPU, 4.4% of a `small`
benchmark train step (RESULTS.md). Statistical quality suited to masks, not to cryptography:
the key still comes from JAX's generator, so masks are a function of the run's seed, and
masks of different keys are uncorrelated (tested). Each 32-bit draw is split into two
16-bit uniforms, so the rate is realised to within 2^-16 (round(rate * 65536) / 65536: keep
is 1 - rate to that resolution, and the scale is 1 / keep so the expectation is x: exactly
in float32, to the scale's rounding in bf16/f16, e.g. 1.109375 for 1 / 0.9 in bf16),
and the mask, scale and multiply compile to one elementwise loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MAX_DRAWS = 2**32  # the counter is one uint32 word


def _mix(x: jnp.ndarray) -> jnp.ndarray:
    """A 32-bit avalanche function (xor-shift-multiply, constants of the "lowbias32" hash):
    every input bit flips each output bit with probability ~1/2."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, count: int) -> jnp.ndarray:
    """`count` pseudo-random uint32 words for `key` (a typed or raw JAX key): the keyed hash
    of the indices 0 .. count-1 (see the module docstring)  ->  [count] uint32"""
    if count > _MAX_DRAWS:
        raise ValueError(f"dropout draws at most 2^32 words ({2 * _MAX_DRAWS} elements) per "
                         f"key, got {count}: apply it to smaller pieces")
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    k0, k1 = words[0], words[1]
    for extra in words[2:]:  # keys of more than 64 bits (e.g. "rbg"): fold them in
        k0 = _mix(k0 ^ extra)
    index = jax.lax.iota(jnp.uint32, count)
    return _mix(_mix(index * jnp.uint32(0x9E3779B9) + k0) ^ k1 ^ jnp.uint32(0x6A09E667))


def dropout(x: jnp.ndarray, rate: float, key: jax.Array | None) -> jnp.ndarray:
    """x: [...] floating -> [...]: each element zeroed with probability `rate` (to 1/65536,
    the resolution of the 16-bit draws), the survivors divided by the probability of keeping
    them, so the expectation is x."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"dropout needs floating-point input, got dtype {x.dtype}; cast it "
                         "first (survivors are scaled by 1 / keep)")
    threshold = round(rate * 65536)
    if threshold == 65536:
        raise ValueError(f"dropout rate {rate} rounds to 1 at the 16-bit resolution of its "
                         "draws (nothing would survive); use a rate below 0.99999")
    if threshold == 0 or x.size == 0:
        return x
    if key is None:
        raise ValueError("dropout with rate > 0 needs a random key")
    if x.size % 2:  # odd sizes: one 32-bit draw per element, its low 16 bits used
        uniform16 = (hash_bits(key, x.size) & 0xFFFF).reshape(x.shape)
    else:  # x viewed as [2, n/2]: row r uses bits r*16 .. r*16+15 of the same draw
        bits = hash_bits(key, x.size // 2)[None]
        shift = jnp.array([[0], [16]], jnp.uint32)
        uniform16 = ((bits >> shift) & 0xFFFF).reshape(x.shape)
    keep = (65536 - threshold) / 65536  # the probability of a draw >= threshold
    scale = jnp.where(uniform16 >= threshold, 1.0 / keep, 0.0).astype(x.dtype)
    return x * scale
