import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_transformer.kernels import dropout


@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("shape", [(64, 257), (3, 5, 7)])
def test_drops_at_the_rate_and_rescales(rate, shape):
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(0)))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / y.size) + 1e-3
    np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-6)


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
