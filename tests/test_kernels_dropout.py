import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_transformer.kernels import dropout
from flax_transformer.kernels.dropout import hash_bits


@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("shape", [(64, 257), (3, 5, 7)])
def test_drops_at_the_rate_and_rescales(rate, shape):
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(0)))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / y.size) + 1e-3
    np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-5)


def test_survivors_are_scaled_by_the_keep_probability_of_the_16_bit_draws():
    """The rate is drawn to 1/65536; the scale is that rate's, so the expectation is x even
    where 1 / (1 - rate) would be far off (near rate 1)."""
    rate = 0.99999  # drops a draw below round(rate * 65536) = 65535: keeps 1 in 65536
    y = np.asarray(dropout(jnp.ones((1 << 20,), jnp.float32), rate, jax.random.key(0)))
    np.testing.assert_allclose(y[y != 0], 65536.0, rtol=1e-6)  # not 1 / (1 - rate) = 1e5
    assert 0 < (y != 0).sum() < 50  # ~16 survivors of 2^20
    with pytest.raises(ValueError, match="rounds to 1 at the 16-bit resolution"):
        dropout(jnp.ones((4,)), 0.999995, jax.random.key(0))
    with pytest.raises(ValueError, match="needs floating-point input"):
        dropout(jnp.full((8,), 10, jnp.int32), 0.3, jax.random.key(0))
    x = jnp.ones((8,))
    assert dropout(x, 1e-6, None) is x  # rounds to no drop at all


def test_same_key_same_mask_different_key_different_mask():
    x = jnp.arange(1000, dtype=jnp.float32)
    a, b = dropout(x, 0.5, jax.random.key(1)), dropout(x, 0.5, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, dropout(x, 0.5, jax.random.key(2)))


def test_unbiased_and_identity_at_rate_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(200, 100)), jnp.float32)
    means = jax.vmap(lambda k: dropout(x, 0.2, k))(jax.random.split(jax.random.key(0), 64))
    assert float(jnp.abs(means.mean(0) - x).mean()) < 0.1
    assert dropout(x, 0.0, None) is x


def test_gradient_is_the_mask_times_the_scale():
    x = jnp.ones((50,), jnp.float32)
    key = jax.random.key(3)
    grad = jax.grad(lambda x: dropout(x, 0.25, key).sum())(x)
    np.testing.assert_array_equal(grad, dropout(x, 0.25, key))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        dropout(jnp.ones(3), 1.0, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a random key"):
        dropout(jnp.ones(3), 0.1, None)


def _correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _kept(key, shape=(256, 1024), rate=0.5):
    return np.asarray(dropout(jnp.ones(shape, jnp.float32), rate, key)) != 0


@pytest.mark.parametrize("shape", [(256, 1024), (255, 1023)])  # two draws per word; odd: one
def test_masks_are_uncorrelated_within_and_across_keys(shape):
    """Neighbouring elements, the two halves of a 32-bit draw, and the masks of related keys
    (consecutive seeds, fold_in steps, splits) are uncorrelated: |r| within 4.5 standard
    errors of 0."""
    kept = _kept(jax.random.key(0), shape)
    bound = 4.5 / np.sqrt(kept.size)
    flat = kept.ravel()
    assert abs(_correlation(flat[:-1], flat[1:])) < bound * np.sqrt(2)
    half = flat.size // 2
    assert abs(_correlation(flat[:half], flat[half:2 * half])) < bound * np.sqrt(2)
    base = jax.random.key(7)
    related = [(jax.random.key(0), jax.random.key(1)),
               (jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)),
               tuple(jax.random.split(base))]
    for a, b in related:
        assert abs(_correlation(_kept(a, shape), _kept(b, shape))) < bound


def test_hash_bits_are_balanced_for_every_bit_and_key_kind():
    for key in (jax.random.key(0), jax.random.PRNGKey(3), jax.random.key(5, impl="rbg")):
        bits = np.asarray(hash_bits(key, 1 << 16))
        ones = (bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1
        assert np.all(np.abs(ones.mean(0) - 0.5) < 4.5 * 0.5 / np.sqrt(bits.size))
        assert len(np.unique(bits)) == bits.size  # a bijection of the index for one key


def test_too_many_draws_for_one_key_is_refused_before_any_work():
    with pytest.raises(ValueError, match="at most 2\\^32 words"):
        hash_bits(jax.random.key(0), 2**32 + 1)
