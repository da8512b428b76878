"""`project`: exact x @ w in float32/float64, float32-accumulated in bfloat16/float16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jaxpr_equations, relative_error

from flax_transformer.kernels import matmul, project


def inputs(rng, x_shape, w_shape, dtype):
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(w_shape[0]), dtype)
    return x, w


def reference(x, w):
    """float64 NumPy x [..., D] @ w [D, *F] -> [..., *F]"""
    return np.tensordot(np.asarray(x, np.float64), np.asarray(w, np.float64), axes=1)


def dot_generals(jaxpr):
    """Every dot_general equation of `jaxpr`, inner jaxprs (pjit, custom_vjp, cond) included."""
    return (eqn for eqn in jaxpr_equations(jaxpr) if eqn.primitive.name == "dot_general")


@pytest.mark.parametrize("w_shape", [(16, 24), (16, 3, 8)])
def test_float32_is_exactly_the_plain_product(rng, w_shape):
    x, w = inputs(rng, (2, 5, 16), w_shape, jnp.float32)
    np.testing.assert_array_equal(project(x, w), jnp.tensordot(x, w, axes=1))
    grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(project(x, w))), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.tensordot(x, w, axes=1))), (0, 1))(x, w)
    for a, b in zip(grads, plain):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_are_2d_matmuls(rng, dtype):
    """x [B, T, D] @ w [D, H, Dh] runs as rows [B*T, D] @ [D, H*Dh], so autodiff's backward
    is made of 2-D matmuls too (a tensordot's backward contracts pairs of axes, which XLA:CPU
    relays out at a cost of 3-7% of a float32 train step)."""
    x, w = inputs(rng, (2, 5, 16), (16, 3, 8), dtype)
    loss = lambda x, w: jnp.sum(project(x, w).astype(jnp.float32) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
    found = list(dot_generals(jaxpr.jaxpr))
    assert len(found) >= 3
    for eqn in found:
        assert [v.aval.ndim for v in eqn.invars] == [2, 2]


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
    found = list(dot_generals(jaxpr.jaxpr))
    assert len(found) == 4  # forward, dx, and dw in its CPU and its default form
    for eqn in found:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.outvars[0].aval.dtype == jnp.float32


@pytest.mark.parametrize("d, f", [(16, 8), (8, 16)])  # g narrower (copies g^T), x narrower
def test_cpu_and_default_weight_gradients_agree(rng, d, f):
    """The two forms of x^T g behind `lax.platform_dependent` (only one runs per backend)."""
    x, g = inputs(rng, (24, d), (24, f), jnp.bfloat16)
    cpu = matmul._weight_grad_cpu(x, g, jnp.float32)
    default = matmul._weight_grad(x, g, jnp.float32)
    exact = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    assert cpu.shape == default.shape == (d, f)
    np.testing.assert_allclose(cpu, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(default, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot kernels")
@pytest.mark.parametrize("f", [96, 32])  # x^T copied for the weight gradient, then g^T
def test_compiled_cpu_dots_read_bf16_operands(rng, f):
    """XLA:CPU upcasts a bf16 dot it has no bf16 kernel for (e.g. x^T g contracting the
    first axis of both) to a float32 dot; in the compiled forward and backward every dot
    must still read bf16 operands."""
    x, w = inputs(rng, (4, 32, 64), (64, f), jnp.bfloat16)
    g = jnp.ones((4, 32, f), jnp.bfloat16)

    def forward_backward(x, w, g):
        out, vjp = jax.vjp(project, x, w)
        return out, *vjp(g)

    hlo = jax.jit(forward_backward).lower(x, w, g).compile().as_text()
    dot_operands = []
    for computation in hlo.split("\n\n"):  # a dot's operands are its computation's parameters
        if " dot(" in computation:
            dot_operands += re.findall(r"= (\w+)\[[\d,]*\]\S* parameter\(", computation)
    assert len(dot_operands) == 6, hlo  # forward, dx, dw: two operands each
    assert set(dot_operands) == {"bf16"}


@pytest.mark.parametrize("w_shape", [(16, 24), (16, 3, 8)])
def test_float32_bias_is_exactly_the_plain_sum(rng, w_shape):
    x, w = inputs(rng, (2, 5, 16), w_shape, jnp.float32)
    b = jnp.asarray(rng.standard_normal(w_shape[1:]), jnp.float32)
    np.testing.assert_array_equal(project(x, w, b), jnp.tensordot(x, w, axes=1) + b)
    ours = jax.grad(lambda x, w, b: jnp.sum(jnp.sin(project(x, w, b))), (0, 1, 2))(x, w, b)
    plain = jax.grad(lambda x, w, b: jnp.sum(jnp.sin(jnp.tensordot(x, w, axes=1) + b)),
                     (0, 1, 2))(x, w, b)
    for a, p in zip(ours, plain):
        np.testing.assert_array_equal(a, p)


@pytest.mark.parametrize("w_shape", [(64, 48), (64, 3, 16)])
def test_low_precision_bias_is_added_before_the_one_rounding(rng, w_shape):
    """bf16 x and w with a float32 bias: bf16 result, the correctly rounded x @ w + b."""
    x, w = inputs(rng, (3, 7, 64), w_shape, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(w_shape[1:]) * 3, jnp.float32)
    out = project(x, w, b)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, 7, *w_shape[1:])
    exact = reference(x, w) + np.asarray(b, np.float64)
    rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
    assert np.all(np.abs(np.asarray(out, np.float64) - rounded) <= 2.0 ** -7 * np.abs(exact)
                  + 1e-5)


def test_low_precision_bias_gradient_is_a_float32_sum(rng):
    """db is the column sum of the incoming gradient, summed in float32, in b's dtype; dx
    and dw are unchanged by the bias."""
    x, w = inputs(rng, (4, 6, 32), (32, 40), jnp.bfloat16)
    b = jnp.zeros((40,), jnp.float32)
    g = jnp.asarray(rng.standard_normal((4, 6, 40)), jnp.bfloat16)
    dx, dw, db = jax.vjp(project, x, w, b)[1](g)
    assert db.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(db, np.asarray(g, np.float64).sum(axis=(0, 1)), rtol=1e-6,
                               atol=1e-5)
    no_bias = jax.vjp(project, x, w)[1](g)
    np.testing.assert_array_equal(dx, no_bias[0])
    np.testing.assert_array_equal(dw, no_bias[1])


def test_a_bias_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"bias b \(8,\) must have w's output shape \(4,\)"):
        project(jnp.zeros((2, 16)), jnp.zeros((16, 4)), jnp.zeros((8,)))


def test_unembed_is_x_times_the_table_transposed(rng):
    """float32: exactly `x @ table.T`, values and gradients; the tied output layer."""
    x, table = inputs(rng, (2, 5, 16), (24, 16), jnp.float32)
    np.testing.assert_array_equal(matmul.unembed(x, table), x @ table.T)
    ours = jax.grad(lambda x, t: jnp.sum(jnp.sin(matmul.unembed(x, t))), (0, 1))(x, table)
    plain = jax.grad(lambda x, t: jnp.sum(jnp.sin(x @ t.T)), (0, 1))(x, table)
    for a, p in zip(ours, plain):
        np.testing.assert_array_equal(a, p)


def test_unembed_low_precision_matches_float64(rng):
    x, table = inputs(rng, (4, 6, 32), (40, 32), jnp.bfloat16)
    out = matmul.unembed(x, table)
    exact = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    assert out.dtype == jnp.bfloat16 and out.shape == (4, 6, 40)
    assert relative_error(out, exact) < 2.0 ** -7
    g = jnp.asarray(rng.standard_normal((4, 6, 40)), jnp.bfloat16)
    dx, dtable = jax.vjp(matmul.unembed, x, table)[1](g)
    assert dx.dtype == dtable.dtype == jnp.bfloat16 and dtable.shape == (40, 32)
    g64, x64 = np.asarray(g, np.float64), np.asarray(x, np.float64)
    assert relative_error(dx, g64 @ np.asarray(table, np.float64)) < 1e-2
    assert relative_error(dtable, np.einsum("btv,btd->vd", g64, x64)) < 1e-2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot kernels")
def test_compiled_unembed_dots_read_bf16_operands(rng):
    """With `project(x, table.T)` XLA:CPU laid the shared transposed table out column-major
    and ran the forward and dx matmuls upcast to float32; `unembed` keeps all three bf16."""
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    table = jnp.asarray(rng.standard_normal((1000, 32)), jnp.float32)

    def loss(x, table):
        logits = matmul.unembed(x, table.astype(jnp.bfloat16)).astype(jnp.float32)
        return jnp.sum(jax.nn.log_softmax(logits))

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, table).compile().as_text()
    dot_operands = []
    for computation in hlo.split("\n\n"):
        if " dot(" in computation:
            dot_operands += re.findall(r"= (\w+)\[[\d,]*\]\S* parameter\(", computation)
    assert len(dot_operands) == 6, hlo  # forward, dx, dtable: two operands each
    assert set(dot_operands) == {"bf16"}


def test_unembed_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        matmul.unembed(jnp.zeros((2, 16)), jnp.zeros((10, 8)))


def test_scalars_are_refused_with_the_shapes_named():
    from flax_transformer.kernels import unembed

    with pytest.raises(ValueError, match="do not chain"):
        project(jnp.float32(1.0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="do not chain"):
        project(jnp.ones((2, 1)), jnp.float32(1.0))
    with pytest.raises(ValueError, match="do not fit"):
        unembed(jnp.float32(1.0), jnp.ones((5, 1)))
