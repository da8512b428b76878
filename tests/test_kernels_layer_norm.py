import jax
import jax.numpy as jnp
import numpy as np
from helpers import relative_error
from jax.test_util import check_grads

from flax_transformer.kernels import layer_norm


def test_matches_float64_reference(rng):
    x = (rng.normal(size=(3, 4, 16)) * 5 + 2).astype(np.float32)
    scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    expected = (x64 - mean) / np.sqrt(var + 1e-6) * scale + bias
    assert relative_error(layer_norm(x, scale, bias), expected) < 1e-6


def test_bfloat16_output_keeps_float32_statistics(rng):
    x = jnp.asarray(rng.normal(size=(2, 8)) + 100.0, jnp.bfloat16)
    y = layer_norm(x, jnp.ones(8), jnp.zeros(8))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32).mean(-1), 0.0, atol=0.05)


def test_gradients():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        args = (rng.normal(size=(3, 6)), rng.normal(size=6), rng.normal(size=6))
        check_grads(layer_norm, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_epsilon_must_be_positive():
    import pytest

    x = jnp.ones((2, 4))
    for epsilon in (0.0, -1e-6, "1e-6"):
        with pytest.raises(ValueError, match="epsilon must be a float > 0"):
            layer_norm(x, jnp.ones(4), jnp.zeros(4), epsilon=epsilon)
    np.testing.assert_array_equal(layer_norm(x, jnp.ones(4), jnp.zeros(4),
                                             epsilon=np.float32(1e-6)),
                                  layer_norm(x, jnp.ones(4), jnp.zeros(4), epsilon=1e-6))
    with pytest.raises(ValueError, match=r"scale and bias must be \[D=4\]"):
        layer_norm(x, jnp.ones(3), jnp.zeros(4))
