import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv, reference_attention, relative_error
from jax.test_util import check_grads

from flax_transformer.kernels import (
    IMPLEMENTATIONS,
    cache_layout,
    cached_attention,
    causal_mask,
    combine_masks,
    multi_head_attention,
    padding_mask,
    single_head_attention,
)

IMPLS = ["vmap", "xla", "dense"]


def key_padding(rng, batch, tk):
    lengths = rng.integers(1, tk + 1, size=batch)
    lengths[0] = tk - 2  # at least one padded row
    tokens = np.where(np.arange(tk)[None] < lengths[:, None], 5, 0)
    return padding_mask(jnp.asarray(tokens))


MASK_CASES = ["none", "causal", "padding", "causal+padding", "full_random"]


def make_case(rng, case, batch, tq, tk, heads):
    mask = None
    if "padding" in case:
        mask = key_padding(rng, batch, tk)
    if case == "full_random":
        mask = jnp.asarray(rng.random((batch, heads, tq, tk)) > 0.3)
    return mask, "causal" in case


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("tq,tk", [(6, 6), (3, 7)])
def test_matches_float64_reference(rng, impl, case, tq, tk):
    q, k, v = random_qkv(rng, batch=3, tq=tq, tk=tk, heads=4)
    mask, causal = make_case(rng, case, 3, tq, tk, 4)
    out = multi_head_attention(q, k, v, mask, causal=causal, implementation=impl)
    assert out.shape == (3, tq, 4, 8) and out.dtype == jnp.float32
    assert relative_error(out, reference_attention(q, k, v, mask, causal)) < 1e-5


@pytest.mark.parametrize("case", MASK_CASES)
def test_matches_jax_nn_dot_product_attention(rng, case):
    q, k, v = random_qkv(rng, batch=2, tq=6, tk=6, heads=2)
    mask, causal = make_case(rng, case, 2, 6, 6, 2)
    if case == "full_random":  # keep every row non-empty: jax.nn averages empty rows
        mask = mask.at[..., 0].set(True)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    for impl in IMPLS:
        out = multi_head_attention(q, k, v, mask, causal=causal, implementation=impl)
        assert relative_error(out, expected) < 1e-5, impl


def test_vmap_equals_loop_over_heads_of_single_head(rng):
    q, k, v = random_qkv(rng, batch=2, tq=4, tk=5, heads=3, dk=6, dv=2)
    mask = jnp.asarray(rng.random((2, 3, 4, 5)) > 0.4)
    out = multi_head_attention(q, k, v, mask, implementation="vmap")
    for b in range(2):
        for h in range(3):
            head = single_head_attention(q[b, :, h], k[b, :, h], v[b, :, h], mask[b, h])
            np.testing.assert_allclose(out[b, :, h], head, rtol=1e-6, atol=1e-6)


def test_single_head_is_the_paper_formula(rng):
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((4, 8), (6, 8), (6, 3)))
    scores = q.astype(np.float64) @ k.T / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    assert relative_error(single_head_attention(q, k, v), weights @ v) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_not_nan(rng, impl):
    q, k, v = random_qkv(rng, batch=1, tq=3, tk=4, heads=2)
    mask = np.ones((1, 2, 3, 4), bool)
    mask[0, 1, 2] = False
    mask[0, 0, 0] = False
    out = np.asarray(multi_head_attention(q, k, v, jnp.asarray(mask), implementation=impl))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 2, 1], 0.0)
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)
    grads = jax.grad(lambda q: multi_head_attention(q, k, v, jnp.asarray(mask),
                                                    implementation=impl).sum())(q)
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("impl", IMPLS)
def test_future_keys_never_change_past_outputs(rng, impl):
    q, k, v = random_qkv(rng, batch=1, tq=6, tk=6, heads=2)
    base = multi_head_attention(q, k, v, causal=True, implementation=impl)
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] += 10.0
    v2[:, 4:] -= 5.0
    changed = multi_head_attention(q, k2, v2, causal=True, implementation=impl)
    np.testing.assert_allclose(base[:, :4], changed[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(base[:, 4:], changed[:, 4:])


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_keys_never_change_any_output(rng, impl):
    q, k, v = random_qkv(rng, batch=2, tq=5, tk=7, heads=2)
    tokens = np.array([[4, 4, 4, 4, 0, 0, 0], [4, 4, 4, 4, 4, 4, 0]])
    mask = padding_mask(jnp.asarray(tokens))
    base = multi_head_attention(q, k, v, mask, implementation=impl)
    k2, v2 = k.copy(), v.copy()
    k2[tokens == 0] = rng.normal(size=k2[tokens == 0].shape) * 100
    v2[tokens == 0] = rng.normal(size=v2[tokens == 0].shape) * 100
    np.testing.assert_allclose(base, multi_head_attention(q, k2, v2, mask, implementation=impl),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_numerically(impl, causal):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, batch=1, tq=4, tk=4, heads=2, dk=3, dv=3, dtype=np.float64)
        mask = jnp.asarray(np.array([1, 1, 1, 0], bool))[None, None, None]
        fn = lambda q, k, v: multi_head_attention(  # noqa: E731
            q, k, v, mask, causal=causal, implementation=impl)
        # jax.nn.dot_product_attention runs its softmax in float32 even for float64 inputs.
        tol = 2e-2 if impl == "xla" else 1e-6
        check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=tol, rtol=tol)


def test_gradients_agree_between_implementations(rng):
    q, k, v = random_qkv(rng, batch=2, tq=5, tk=5, heads=2)
    mask = key_padding(rng, 2, 5)

    def grads(impl):
        loss = lambda *a: (multi_head_attention(*a, mask, causal=True,  # noqa: E731
                                                implementation=impl) ** 2).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    grads = {impl: grads(impl) for impl in IMPLS}
    for impl in IMPLS[1:]:
        for a, b in zip(grads["vmap"], grads[impl]):
            assert relative_error(a, b) < 1e-5, impl


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_compute_softmax_in_float32(rng, impl):
    q, k, v = random_qkv(rng)
    out = multi_head_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                               implementation=impl)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_attention(q, k, v)) < 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_gradients_stay_close_to_float32(rng, impl):
    q, k, v = random_qkv(rng, batch=2, tq=6, tk=6, heads=2)
    mask = key_padding(rng, 2, 6)

    def grads(dtype):
        loss = lambda *a: multi_head_attention(  # noqa: E731
            *a, mask, causal=True, implementation=impl).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, dtype) for x in (q, k, v)))

    for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32)):
        assert low.dtype == jnp.bfloat16
        assert relative_error(low, high) < 5e-2


def test_attention_dropout(rng):
    q, k, v = random_qkv(rng, batch=2, tq=16, tk=16, heads=2)
    key = jax.random.key(0)
    a = multi_head_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    b = multi_head_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    c = multi_head_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, multi_head_attention(q, k, v))
    # Dropout is unbiased: averaged over many keys it approaches the undropped output.
    keys = jax.random.split(jax.random.key(2), 256)
    mean = jax.vmap(lambda r: multi_head_attention(q, k, v, dropout_rate=0.5, dropout_rng=r))(keys)
    assert relative_error(mean.mean(0), multi_head_attention(q, k, v)) < 0.15


def test_works_under_jit(rng):
    q, k, v = random_qkv(rng)
    for impl in IMPLS:
        fn = jax.jit(functools.partial(multi_head_attention, causal=True, implementation=impl))
        assert relative_error(fn(q, k, v), reference_attention(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(implementation="flash"), "implementation='flash' is not known"),
        (dict(mask=jnp.ones((2, 3, 5), bool)), "mask must be 4-D"),
        (dict(mask=jnp.ones((2, 2, 5, 7), bool)), "heads is 2, expected 1 or 3"),
        (dict(mask=jnp.ones((1, 1, 5, 6), bool)), "key length is 6"),
        (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)),
         r"dropout_rate must be in \[0, 1\)"),
        (dict(dropout_rate=0.1), "needs a dropout_rng"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0), implementation="xla"),
         "no attention dropout"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0), implementation="dense"),
         "'dense' has no attention dropout"),
    ],
)
def test_bad_arguments_raise_value_error(rng, kwargs, match):
    q, k, v = random_qkv(rng)
    with pytest.raises(ValueError, match=match):
        multi_head_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_value_error(rng):
    q, k, v = random_qkv(rng)
    with pytest.raises(ValueError, match="batch sizes differ"):
        multi_head_attention(q[:1], k, v)
    with pytest.raises(ValueError, match="head_dim differ"):
        multi_head_attention(q[..., :4], k, v)
    with pytest.raises(ValueError, match="lengths differ"):
        multi_head_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        multi_head_attention(q[0], k, v)


@pytest.mark.parametrize(
    "shapes,mask,kwargs,match",
    [
        (((4, 8), (6, 8), (6, 3)), ((4, 5), bool), {}, "key length is 5, expected 1 or 6"),
        (((4, 8), (6, 8), (6, 3)), ((6, 6), bool), {}, "query length is 6, expected 1 or 4"),
        (((4, 8), (6, 8), (6, 3)), ((1, 4, 6), bool), {}, "mask must be 2-D"),
        (((4, 8), (6, 8), (6, 3)), ((4, 6), jnp.int32), {}, "mask must be boolean"),
        (((4, 8), (6, 7), (6, 3)), None, {}, "q and k head_dim differ"),
        (((4, 8), (6, 8), (5, 3)), None, {}, "k and v lengths differ"),
        (((2, 4, 8), (6, 8), (6, 3)), None, {}, r"q must be \[length, head_dim\]"),
        (((4, 8), (6, 8), (1, 6, 3)), None, {}, r"v must be \[length, head_dim\]"),
        (((4, 8), (6, 8), (6, 3)), None, dict(dropout_rate=0.5), "needs a dropout_rng"),
        (((4, 8), (6, 8), (6, 3)), None, dict(dropout_rate=1.5, dropout_rng=jax.random.key(0)),
         r"dropout_rate must be in \[0, 1\)"),
    ],
)
def test_single_head_bad_arguments_raise_value_error(rng, shapes, mask, kwargs, match):
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
    if mask is not None:
        mask = jnp.ones(mask[0], mask[1])
    with pytest.raises(ValueError, match=match):
        single_head_attention(q, k, v, mask, **kwargs)


def test_single_head_accepts_broadcast_masks_and_jit(rng):
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((4, 8), (6, 8), (6, 3)))
    keys = jnp.asarray([True] * 4 + [False] * 2)
    full = single_head_attention(q, k, v, jnp.broadcast_to(keys, (4, 6)))
    np.testing.assert_allclose(single_head_attention(q, k, v, keys[None]), full, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(single_head_attention)(q, k, v, keys[None]), full,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_rejects_causal_with_more_queries_than_keys(rng, impl):
    q, k, v = random_qkv(rng, batch=2, tq=5, tk=3, heads=2)
    with pytest.raises(ValueError, match="causal=True needs query length <= key length"):
        multi_head_attention(q, k, v, causal=True, implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32, np.uint8])
def test_every_implementation_rejects_non_boolean_masks(rng, impl, dtype):
    q, k, v = random_qkv(rng, batch=2, tq=4, tk=4, heads=2)
    mask = np.ones((2, 1, 1, 4), dtype)
    with pytest.raises(ValueError, match="mask must be boolean .* pass mask.astype\\(bool\\)"):
        multi_head_attention(q, k, v, mask, implementation=impl)
    out = multi_head_attention(q, k, v, mask.astype(bool), implementation=impl)  # the fix
    assert relative_error(out, reference_attention(q, k, v)) < 1e-5


def test_masks():
    np.testing.assert_array_equal(causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(causal_mask(2, 4)[0, 0], [[1, 1, 1, 0], [1, 1, 1, 1]])
    pm = padding_mask(jnp.array([[5, 6, 0], [7, 0, 0]]))
    assert pm.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(pm[:, 0, 0], [[1, 1, 0], [1, 0, 0]])
    both = combine_masks(pm, None, causal_mask(3))
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(both[1, 0], [[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    assert combine_masks(None, None) is None
    with pytest.raises(ValueError, match="key_length"):
        causal_mask(4, 2)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        padding_mask(jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("case", ["none", "padding", "full_random"])
@pytest.mark.parametrize("tq", [1, 3])
def test_cached_attention_matches_reference_and_jax_nn(rng, case, tq):
    q, k, v = random_qkv(rng, batch=3, tq=tq, tk=7, heads=4)
    mask, _ = make_case(rng, case, 3, tq, 7, 4)
    out = cached_attention(q, *cache_layout(jnp.asarray(k), jnp.asarray(v)), mask)
    assert out.shape == (3, tq, 4, 8) and out.dtype == jnp.float32
    assert relative_error(out, reference_attention(q, k, v, mask)) < 1e-5
    if case != "full_random":  # jax.nn averages fully masked rows; we return zeros
        expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
        assert relative_error(out, expected) < 1e-5


def test_cached_attention_refuses_caches_that_do_not_fit(rng):
    q, k, v = random_qkv(rng, batch=2, tq=1, tk=5, heads=2)
    key_cache, value_cache = cache_layout(jnp.asarray(k), jnp.asarray(v))
    bad = [
        ((q[0], key_cache, value_cache, None), r"q \[B, Tq, H, Dk\]"),
        ((q, key_cache[:2], value_cache, None), "caches do not fit"),
        ((q, key_cache, value_cache[:, :4], None), "caches do not fit"),
        ((q, key_cache, value_cache, jnp.ones((2, 1, 1, 4), bool)), "key length is 4"),
        ((q, key_cache, value_cache, jnp.ones((2, 1, 1, 5), jnp.int32)), "must be boolean"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            cached_attention(*args)


def test_cached_attention_fully_masked_rows_and_grads(rng):
    q, k, v = random_qkv(rng, batch=2, tq=1, tk=4, heads=2)
    mask = jnp.asarray([True, True, False, False])[None, None, None, :]
    mask = jnp.concatenate([mask, jnp.zeros_like(mask)], axis=0)  # batch 1: nothing visible
    out = cached_attention(q, *cache_layout(jnp.asarray(k), jnp.asarray(v)), mask)
    assert not np.isnan(np.asarray(out)).any() and np.all(np.asarray(out[1]) == 0)
    with jax.enable_x64(True):
        caches = cache_layout(jnp.asarray(k), jnp.asarray(v))
        args = [jnp.asarray(x, jnp.float64) for x in (q, *caches)]
        check_grads(lambda a, b, c: cached_attention(a, b, c, mask), args, order=1,
                    modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_integer_inputs_are_refused(rng, implementation):
    q, k, v = random_qkv(rng)
    with pytest.raises(ValueError, match="q must be a floating-point array"):
        multi_head_attention(q.astype(np.int32), k, v, implementation=implementation)
    with pytest.raises(ValueError, match="v must be a floating-point array"):
        multi_head_attention(q, k, v.astype(np.int32), implementation=implementation)


def test_integer_inputs_are_refused_by_the_single_head_and_cached_paths(rng):
    q, k, v = random_qkv(rng)
    with pytest.raises(ValueError, match="k must be a floating-point array"):
        single_head_attention(q[0, :, 0], k[0, :, 0].astype(np.int32), v[0, :, 0])
    key, value = cache_layout(jnp.asarray(k), jnp.asarray(v))
    with pytest.raises(ValueError, match="value_cache must be a floating-point array"):
        cached_attention(q, key, value.astype(jnp.int32))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("tq, tk", [(0, 7), (5, 0), (0, 0)])
def test_empty_queries_or_keys_give_zeros(rng, implementation, tq, tk):
    q, k, v = random_qkv(rng, tq=tq, tk=tk, dv=6 if implementation != "xla" else 8)
    out = multi_head_attention(q, k, v, implementation=implementation)
    assert out.shape == (2, tq, 3, v.shape[-1]) and out.dtype == q.dtype
    assert not np.any(np.asarray(out))


def test_xla_path_promotes_mixed_dtypes_as_the_others_do(rng):
    q, k, v = random_qkv(rng)
    q16 = jnp.asarray(q, jnp.bfloat16)
    expected = multi_head_attention(q16, k, v, implementation="vmap")
    out = multi_head_attention(q16, k, v, implementation="xla")
    assert out.dtype == expected.dtype == jnp.bfloat16
    assert relative_error(out, expected) < 1e-2


def test_mask_must_be_an_array():
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        multi_head_attention(*random_qkv(np.random.default_rng(0)), [[True]])


def test_mask_helpers_refuse_non_integer_lengths_and_accept_lists():
    with pytest.raises(ValueError, match="length must be an int"):
        causal_mask(2.5)
    with pytest.raises(ValueError, match="key_length must be an int"):
        causal_mask(2, "3")
    assert padding_mask([[5, 0]]).tolist() == [[[[True, False]]]]
