import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relative_error
from jax.test_util import check_grads

from flax_transformer.kernels import feed_forward, sinusoidal_positions


def ffn_params(rng, d=6, f=10):
    return tuple(rng.normal(size=s).astype(np.float32) for s in ((d, f), (f,), (f, d), (d,)))


def test_feed_forward_matches_numpy(rng):
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    w1, b1, w2, b2 = ffn_params(rng)
    x64 = x.astype(np.float64)
    expected = np.maximum(x64 @ w1 + b1, 0.0) @ w2 + b2
    assert relative_error(feed_forward(x, w1, b1, w2, b2), expected) < 1e-6


def test_feed_forward_gelu_and_no_bias(rng):
    from math import erf
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w1, _, w2, _ = ffn_params(rng)
    h = x.astype(np.float64) @ w1
    gelu = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    out = feed_forward(x, w1, None, w2, None, activation="gelu")
    assert relative_error(out, gelu @ w2) < 1e-5


def test_feed_forward_gradients(rng):
    x = rng.normal(size=(2, 6)).astype(np.float32)
    params = ffn_params(rng)
    fn = lambda *a: feed_forward(*a, activation="gelu_tanh")  # noqa: E731
    check_grads(fn, (x, *params), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


def test_feed_forward_errors(rng):
    w1, b1, w2, b2 = ffn_params(rng)
    with pytest.raises(ValueError, match="activation='tanh' is not known"):
        feed_forward(np.ones((2, 6), np.float32), w1, b1, w2, b2, activation="tanh")
    with pytest.raises(ValueError, match="do not chain"):
        feed_forward(np.ones((2, 5), np.float32), w1, b1, w2, b2)


@pytest.mark.parametrize(
    "index,shape,match",
    [
        (1, (9,), r"b1 must have shape \(10,\) to match w1 \(6, 10\), got \(9,\)"),
        (1, (1, 10), r"b1 must have shape \(10,\)"),
        (3, (5,), r"b2 must have shape \(6,\) to match w2 \(10, 6\), got \(5,\)"),
        (0, (6, 9), "shapes do not chain"),
        (2, (9, 6), "shapes do not chain"),
        (2, (10, 5), "shapes do not chain"),
        (0, (6, 10, 1), r"need x \[..., D\], w1 \[D, F\], w2 \[F, D\]"),
    ],
)
def test_feed_forward_bad_parameter_shapes(rng, index, shape, match):
    params = list(ffn_params(rng))
    params[index] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=match):
        feed_forward(np.ones((2, 3, 6), np.float32), *params)


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == np.float32
    pos, i = 7, 3
    np.testing.assert_allclose(pe[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)), rtol=1e-6)
    np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)), rtol=1e-6)
    np.testing.assert_array_equal(pe[0, 0::2], 0.0)
    np.testing.assert_array_equal(pe[0, 1::2], 1.0)
    with pytest.raises(ValueError, match="even d_model"):
        sinusoidal_positions(10, 7)
    assert jnp.asarray(pe).shape == (50, 16)


def test_positions_and_activation_names_are_checked():
    with pytest.raises(ValueError, match="max_len must be an int"):
        sinusoidal_positions(2.5, 8)
    with pytest.raises(ValueError, match="d_model must be an int"):
        sinusoidal_positions(4, True)
    w1, w2 = jnp.ones((4, 8)), jnp.ones((8, 4))
    with pytest.raises(ValueError, match="activation must be a name"):
        feed_forward(jnp.ones((2, 4)), w1, None, w2, None, activation=["relu"])
