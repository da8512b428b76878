"""`project`: exact x @ w in float32/float64, float32-accumulated in bfloat16/float16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from flax_transformer.kernels import project


def inputs(rng, x_shape, w_shape, dtype):
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(w_shape[0]), dtype)
    return x, w


def reference(x, w):
    """float64 NumPy x [..., D] @ w [D, *F] -> [..., *F]"""
    return np.tensordot(np.asarray(x, np.float64), np.asarray(w, np.float64), axes=1)


@pytest.mark.parametrize("w_shape", [(16, 24), (16, 3, 8)])
def test_float32_is_exactly_the_plain_product(rng, w_shape):
    x, w = inputs(rng, (2, 5, 16), w_shape, jnp.float32)
    np.testing.assert_array_equal(project(x, w), jnp.tensordot(x, w, axes=1))
    grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(project(x, w))), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.tensordot(x, w, axes=1))), (0, 1))(x, w)
    for a, b in zip(grads, plain):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("w_shape", [(64, 48), (64, 3, 16)])
def test_low_precision_forward_rounds_once_from_float32_sums(rng, dtype, w_shape):
    x, w = inputs(rng, (3, 7, 64), w_shape, dtype)
    out = project(x, w)
    assert out.dtype == dtype and out.shape == (3, 7, *w_shape[1:])
    exact = reference(x, w)  # the inputs are already rounded: only the sums and one rounding
    rounded = np.asarray(jnp.asarray(exact, dtype), np.float64)
    ulp = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10
    # float32 sums are exact to ~1e-6 here, so the result is the correctly rounded value or
    # its neighbour when the exact value lies next to a rounding boundary
    assert np.all(np.abs(np.asarray(out, np.float64) - rounded) <= ulp * np.abs(exact) + 1e-6)
    assert relative_error(out, exact) < ulp


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradients_match_float64(rng, dtype):
    x, w = inputs(rng, (4, 6, 32), (32, 40), dtype)
    g = rng.standard_normal((4, 6, 40))
    dx, dw = jax.vjp(project, x, w)[1](jnp.asarray(g, dtype))
    assert dx.dtype == dtype and dw.dtype == dtype
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    g64 = np.asarray(jnp.asarray(g, dtype), np.float64)
    assert relative_error(dx, g64 @ w64.T) < 1e-2
    assert relative_error(dw, np.einsum("btd,btf->df", x64, g64)) < 1e-2


def test_float32_cotangent_is_rounded_to_the_compute_dtype(rng):
    """A float32 loss gradient reaching a bf16 projection (the usual mixed-precision case)."""
    x, w = inputs(rng, (2, 3, 16), (16, 8), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(project(x, w).astype(jnp.float32) ** 2)  # noqa: E731
    dx, dw = jax.grad(loss, (0, 1))(x, w)
    out = np.asarray(project(x, w), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    assert relative_error(dx, (2 * out) @ w64.T) < 1e-2
    assert relative_error(dw, np.einsum("btd,btf->df", x64, 2 * out)) < 1e-2


def test_low_precision_matches_the_plain_bf16_product_under_jit(rng):
    x, w = inputs(rng, (8, 128), (128, 96), jnp.bfloat16)
    ours = jax.jit(project)(x, w)
    plain = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(plain, np.float32),
                               rtol=2 ** -7, atol=1e-6)


def test_shapes_that_do_not_chain_are_refused():
    with pytest.raises(ValueError, match="do not chain"):
        project(jnp.zeros((2, 16)), jnp.zeros((8, 4)))


def test_mixed_dtypes_promote_like_matmul(rng):
    x, w = inputs(rng, (2, 16), (16, 4), jnp.float32)
    out = project(x.astype(jnp.bfloat16), w)
    assert out.dtype == (x.astype(jnp.bfloat16) @ w).dtype == jnp.float32
    np.testing.assert_array_equal(out, x.astype(jnp.bfloat16).astype(jnp.float32) @ w)


def test_every_training_matmul_takes_bf16_operands_and_sums_in_float32(rng):
    """The property that makes bf16 fast on CPUs (AVX512-BF16): forward and both backward
    products are bf16 x bf16 -> float32 dots, also when the loss gradient arrives in float32."""
    x, w = inputs(rng, (2, 3, 16), (16, 8), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(project(x, w).astype(jnp.float32) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for param in eqn.params.values():  # inner jaxprs (pjit, custom_vjp_call)
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    yield from dots(getattr(inner, "jaxpr", inner))

    found = list(dots(jaxpr.jaxpr))
    assert len(found) == 3
    for eqn in found:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.outvars[0].aval.dtype == jnp.float32
