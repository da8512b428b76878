"""Blockwise attention equals the reference paths (values and gradients), on tiny odd shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_transformer.kernels.attention import multi_head_attention
from flax_transformer.kernels.blockwise import blockwise_attention


def reference_attention(q, k, v, mask=None, causal=False):
    """float64 NumPy attention; rows with no visible key give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    (_, tq, _, dk), tk = q.shape, k.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dk)
    allowed = np.ones(scores.shape, bool)
    if mask is not None:
        allowed &= np.asarray(mask, bool)
    if causal:
        allowed &= np.arange(tk)[None, :] <= np.arange(tq)[:, None] + tk - tq
    scores = np.where(allowed, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def make_inputs(seed, batch, tq, tk, heads, dk, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, tq, heads, dk))
    k = rng.standard_normal((batch, tk, heads, dk))
    v = rng.standard_normal((batch, tk, heads, dv))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def make_mask(kind, seed, batch, tq, tk, heads):
    rng = np.random.default_rng(seed + 100)
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, Tk]; every example keeps at least its first key
        lengths = rng.integers(1, tk + 1, size=batch)
        return jnp.asarray(np.arange(tk)[None, None, None, :] < lengths[:, None, None, None])
    if kind == "full":  # [B, H, Tq, Tk]
        return jnp.asarray(rng.random((batch, heads, tq, tk)) > 0.4)
    if kind == "query":  # [B, 1, Tq, 1]: some query rows see nothing
        return jnp.asarray(rng.random((batch, 1, tq, 1)) > 0.3)
    if kind == "head_key":  # [1, H, 1, Tk]
        return jnp.asarray(rng.random((1, heads, 1, tk)) > 0.3)
    raise ValueError(kind)


# (batch, Tq, Tk, heads, Dk, Dv, causal, mask kind, block_size)
CASES = {
    "plain": (2, 37, 37, 3, 8, 8, False, None, 8),
    "causal": (2, 37, 37, 3, 8, 8, True, None, 8),
    "padding": (2, 29, 29, 2, 8, 8, False, "padding", 4),
    "full_mask": (2, 19, 23, 3, 4, 4, False, "full", 8),
    "causal_padding": (2, 37, 37, 2, 8, 8, True, "padding", 8),
    "query_mask": (2, 21, 21, 2, 8, 8, True, "query", 8),
    "head_key_mask": (2, 21, 18, 3, 8, 8, False, "head_key", 8),
    "cross": (2, 11, 23, 2, 8, 6, False, None, 4),
    "cross_padding": (1, 13, 29, 2, 8, 8, False, "padding", 8),
    "causal_tq_lt_tk": (1, 13, 29, 2, 4, 4, True, None, 4),
    "single_query": (2, 1, 17, 2, 8, 8, True, None, 4),
    "length_one": (1, 1, 1, 1, 4, 4, True, None, 4),
    "one_block": (1, 16, 16, 2, 8, 8, True, None, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_references(case):
    batch, tq, tk, heads, dk, dv, causal, kind, block = CASES[case]
    q, k, v = make_inputs(0, batch, tq, tk, heads, dk, dv)
    mask = make_mask(kind, 0, batch, tq, tk, heads)
    out = blockwise_attention(q, k, v, mask, causal=causal, block_size=block)
    assert out.shape == (batch, tq, heads, dv) and out.dtype == q.dtype
    vmap = multi_head_attention(q, k, v, mask, causal=causal, implementation="vmap")
    np.testing.assert_allclose(out, vmap, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask, causal), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_vmap(case):
    batch, tq, tk, heads, dk, dv, causal, kind, block = CASES[case]
    q, k, v = make_inputs(1, batch, tq, tk, heads, dk, dv)
    mask = make_mask(kind, 1, batch, tq, tk, heads)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((batch, tq, heads, dv)),
                            jnp.float32)

    def grads(implementation):
        def f(q, k, v):
            return multi_head_attention(q, k, v, mask, causal=causal, block_size=block,
                                        implementation=implementation)

        return jax.jit(lambda *args: jax.vjp(f, *args)[1](cotangent))(q, k, v)

    for got, want in zip(grads("blockwise"), grads("vmap")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["causal_padding", "full_mask", "causal_tq_lt_tk"])
def test_check_grads_float64(case):
    batch, tq, tk, heads, dk, dv, causal, kind, block = CASES[case]
    with jax.enable_x64(True):
        q, k, v = make_inputs(3, batch, tq, tk, heads, dk, dv, jnp.float64)
        mask = make_mask(kind, 3, batch, tq, tk, heads)

        @jax.jit
        def f(q, k, v):
            return blockwise_attention(q, k, v, mask, causal=causal, block_size=block)

        assert f(q, k, v).dtype == jnp.float64
        check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    batch, tq, tk, heads = 2, 13, 11, 2
    q, k, v = make_inputs(4, batch, tq, tk, heads, 8, 8)
    mask = np.random.default_rng(4).random((batch, heads, tq, tk)) > 0.5
    mask[0, 1, 3] = False  # one fully masked query row
    mask[1, :, 7:] = False  # several, in every head
    mask = jnp.asarray(mask)
    nobody = jnp.zeros((1, 1, 1, tk), bool)  # no key may be attended to

    @jax.jit
    def run(q, k, v, mask):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(blockwise_attention(q, k, v, mask, block_size=4)))

        return blockwise_attention(q, k, v, mask, block_size=4), jax.grad(loss, (0, 1, 2))(q, k, v)

    out, (dq, dk, dv) = run(q, k, v, mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 3, 1], 0.0)
    np.testing.assert_array_equal(out[1, 7:], 0.0)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(dq[0, 3, 1], 0.0)
    np.testing.assert_array_equal(dq[1, 7:], 0.0)
    out, grads = run(q, k, v, nobody)
    np.testing.assert_array_equal(out, 0.0)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("block_size", [8, 64], ids=["several blocks", "one block"])
def test_bfloat16_runs_and_stays_close_to_float32(block_size):
    q, k, v = make_inputs(5, 2, 33, 33, 2, 16, 16)

    @jax.jit
    def run(q, k, v):
        def f(q, k, v):
            return blockwise_attention(q, k, v, causal=True, block_size=block_size)

        return f(q, k, v), jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    ref, ref_grads = run(q, k, v)
    out, grads = run(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)
    for g, want in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), want, atol=1e-1, rtol=1e-1)


def test_jit_and_multi_head_attention_dispatch():
    q, k, v = make_inputs(6, 2, 21, 21, 2, 8, 8)
    mask = make_mask("padding", 6, 2, 21, 21, 2)

    @jax.jit
    def f(q, k, v, mask):
        return multi_head_attention(q, k, v, mask, causal=True, implementation="blockwise",
                                    block_size=8)

    out = f(q, k, v, mask)
    want = multi_head_attention(q, k, v, mask, causal=True, implementation="vmap")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda q, k, v: f(q, k, v, mask).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))


def test_block_size_does_not_change_the_result():
    q, k, v = make_inputs(7, 1, 45, 45, 2, 8, 8)
    blocks = (1, 5, 16, 512, (3, 7), (16, 1))
    attend = jax.jit(blockwise_attention, static_argnames=("causal", "block_size"))
    outs = [attend(q, k, v, causal=True, block_size=b) for b in blocks]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)


def test_invalid_inputs_raise():
    q, k, v = make_inputs(8, 1, 5, 5, 1, 4, 4)
    for bad in (0, (4, 0), (1, 2, 3)):
        with pytest.raises(ValueError, match="block_size"):
            blockwise_attention(q, k, v, block_size=bad)
    with pytest.raises(ValueError, match="mask"):
        blockwise_attention(q, k, v, jnp.ones((1, 1, 5, 4), bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        blockwise_attention(q, k, v, jnp.ones((1, 1, 5, 5), jnp.int32))
    with pytest.raises(ValueError, match="causal=True needs query length <= key length"):
        blockwise_attention(q, k[:, :3], v[:, :3], causal=True)


@pytest.mark.parametrize("block_size", [2.5, None, (4.7, 3.2), True, (4,), (4, 0), "8"])
def test_bad_block_sizes_are_refused(block_size):
    q, k, v = (jnp.ones((1, 4, 1, 8)),) * 3
    with pytest.raises(ValueError, match="block_size must be an int >= 1 or a pair"):
        blockwise_attention(q, k, v, block_size=block_size)


def test_numpy_integer_block_sizes_are_accepted():
    q, k, v = (jnp.ones((1, 4, 1, 8)),) * 3
    a = blockwise_attention(q, k, v, block_size=np.int64(4))
    b = blockwise_attention(q, k, v, block_size=(np.int32(4), 2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
