import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import jaxpr_equations, relative_error

from flax_transformer import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    MultiHeadAttention,
    Transformer,
    TransformerConfig,
)
from flax_transformer.kernels import IMPLEMENTATIONS, padding_mask

TINY = TransformerConfig.preset("tiny")


def tokens(rng, shape, vocab=32, pad_from=None):
    out = rng.integers(4, vocab, size=shape)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            out[row, start:] = 0
    return jnp.asarray(out, jnp.int32)


def test_attention_self_and_cross_shapes(rng):
    mha = MultiHeadAttention(TINY, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    assert mha(x).shape == (2, 5, 32)
    assert mha(x, memory).shape == (2, 5, 32)
    assert mha(x, causal=True).shape == (2, 5, 32)


def test_fused_self_attention_equals_separate_projections(rng):
    mha = MultiHeadAttention(TINY, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    np.testing.assert_allclose(mha(x), mha(x, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_projection_gradients_are_concatenated_not_padded(rng, cross):
    """The fused Q/K/V (and cross-attention K/V) projection is split, so the backward pass
    joins the heads' gradients with one concatenate; three slices would give pads and adds,
    which XLA:CPU fused into the slowest loop of a bf16 train step."""
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32) if cross else None
    graphdef, params = nnx.split(MultiHeadAttention(TINY, rngs=nnx.Rngs(0)))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x, memory) ** 2)

    names = {eqn.primitive.name
             for eqn in jaxpr_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)}
    assert "split" in names and "concatenate" in names
    assert "pad" not in names


def test_attention_matches_explicit_heads(rng):
    """MultiHead(Q,K,V) = Concat(head_1..head_H) W^O with head_i = Attention(QW_i^Q, ...)."""
    mha = MultiHeadAttention(TINY, rngs=nnx.Rngs(1))
    x = rng.normal(size=(1, 4, 32))
    memory = rng.normal(size=(1, 6, 32))
    wq, bq = np.asarray(mha.query_kernel[...]), np.asarray(mha.query_bias[...])
    wkv, bkv = np.asarray(mha.key_value_kernel[...]), np.asarray(mha.key_value_bias[...])
    wo, bo = np.asarray(mha.output_kernel[...]), np.asarray(mha.output_bias[...])
    heads = []
    for h in range(4):
        cols = slice(8 * h, 8 * h + 8)
        q = x[0] @ wq[:, cols] + bq[cols]
        k = memory[0] @ wkv[:, 0, cols] + bkv[0, cols]
        v = memory[0] @ wkv[:, 1, cols] + bkv[1, cols]
        s = q @ k.T / np.sqrt(8)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v)
    expected = np.concatenate(heads, -1) @ wo + bo
    out = mha(jnp.asarray(x, jnp.float32), jnp.asarray(memory, jnp.float32))
    assert relative_error(out[0], expected) < 1e-5


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_layers_and_stacks_shapes(rng, norm):
    config = TINY.replace(norm=norm)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
    mask = padding_mask(tokens(rng, (2, 5), pad_from=[5, 3]))
    assert FeedForward(config, rngs=nnx.Rngs(0))(x).shape == (2, 5, 32)
    assert EncoderLayer(config, rngs=nnx.Rngs(0))(x, mask).shape == (2, 5, 32)
    assert DecoderLayer(config, rngs=nnx.Rngs(0))(y, x, mask).shape == (2, 3, 32)
    memory = Encoder(config, rngs=nnx.Rngs(0))(x, mask)
    assert memory.shape == (2, 5, 32)
    assert Decoder(config, rngs=nnx.Rngs(0))(y, memory, mask).shape == (2, 3, 32)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transformer_forward(rng, norm, impl):
    config = TINY.replace(norm=norm, attention_impl=impl, attention_block_size=4)
    model = Transformer(config, rngs=nnx.Rngs(0))
    src = tokens(rng, (3, 6), pad_from=[6, 4, 2])
    tgt = tokens(rng, (3, 5))
    logits = model(src, tgt)
    assert logits.shape == (3, 5, 32) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    memory = model.encode(src)
    np.testing.assert_allclose(model.decode(tgt, memory, padding_mask(src)), logits, atol=1e-6)


def test_implementations_agree_inside_the_model(rng):
    src, tgt = tokens(rng, (2, 6), pad_from=[6, 3]), tokens(rng, (2, 5))
    outs = [Transformer(TINY.replace(attention_impl=impl, attention_block_size=4),
                        rngs=nnx.Rngs(0))(src, tgt) for impl in IMPLEMENTATIONS]
    for out in outs[1:]:
        assert relative_error(out, outs[0]) < 1e-5


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_future_target_tokens_never_change_earlier_outputs(rng, norm):
    model = Transformer(TINY.replace(norm=norm), rngs=nnx.Rngs(0))
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 7))
    base = model(src, tgt)
    for t in range(1, 7):
        changed = tgt.at[:, t:].set(tokens(rng, (2, 7 - t)))
        np.testing.assert_allclose(model(src, changed)[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_padded_source_positions_never_change_any_output(rng, impl):
    model = Transformer(TINY.replace(attention_impl=impl, attention_block_size=4),
                        rngs=nnx.Rngs(0))
    src = tokens(rng, (2, 5), pad_from=[3, 5])
    tgt = tokens(rng, (2, 4))
    base = model(src, tgt)
    longer = jnp.concatenate([src, jnp.zeros((2, 4), jnp.int32)], axis=1)  # more padding
    np.testing.assert_allclose(model(longer, tgt), base, rtol=1e-5, atol=1e-5)
    # Garbage in the encoder memory at padded positions is never read.
    memory = model.encode(src)
    noisy = jnp.where((src == 0)[..., None], 1e3, memory)
    np.testing.assert_allclose(model.decode(tgt, noisy, padding_mask(src)), base,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_float32_params_stays_close(rng):
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))
    f32 = Transformer(TINY, rngs=nnx.Rngs(0))
    bf16 = Transformer(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.state(bf16, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = bf16(src, tgt)
    assert out.dtype == jnp.float32
    assert relative_error(out, f32(src, tgt)) < 5e-2


def test_bfloat16_compute_gradients_stay_close_to_float32(rng):
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model = Transformer(TINY.replace(dtype=dtype), rngs=nnx.Rngs(0))
        grad = nnx.grad(lambda m: jnp.mean(m(src, tgt) ** 2))(model)  # noqa: B023
        grads[dtype] = jax.tree.leaves(nnx.state(grad, nnx.Param))
    for f32, bf16 in zip(grads["float32"], grads["bfloat16"]):
        assert bf16.dtype == jnp.float32
        assert relative_error(bf16, f32) < 0.15  # small leaves: a few bf16 roundings deep
    flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves])  # noqa: E731
    assert relative_error(flat(grads["bfloat16"]), flat(grads["float32"])) < 5e-2


def test_bfloat16_embedding_lookup_casts_rows_not_the_table(rng):
    # The lookup takes rows of the float32 table, then casts: no [V, D] conversion in either
    # pass, and the gradient of a repeated id is summed in float32, not in bfloat16.
    config = TINY.replace(dtype="bfloat16", src_vocab_size=37, tie_output=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    src = jnp.full((4, 12), 5, jnp.int32)  # one id, 48 times
    w = jnp.asarray(rng.normal(size=(4, 12, config.d_model)), jnp.bfloat16)

    graphdef, state = nnx.split(model)

    def loss(state):
        m = nnx.merge(graphdef, state)
        return jnp.sum((m.embed(src, m.src_embed) * w).astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
    table_casts = [e for e in jaxpr_equations(jaxpr) if e.primitive.name == "convert_element_type"
                   and e.invars[0].aval.shape == (37, config.d_model)]
    assert not table_casts
    grad = np.asarray(jax.grad(loss)(state)["src_embed"]["embedding"][...])
    # d/d row = the sum over the 48 positions of w * sqrt(d_model), each product a bf16
    per_position = np.asarray(w * jnp.asarray(np.sqrt(config.d_model), jnp.bfloat16), np.float64)
    expected = per_position.sum(axis=(0, 1))
    np.testing.assert_allclose(grad[5], expected, rtol=1e-5, atol=1e-5)
    assert not np.any(np.delete(grad, 5, axis=0))


def test_dropout_train_and_eval_modes(rng):
    model = Transformer(TINY.replace(dropout_rate=0.3, attention_dropout_rate=0.2,
                                     attention_impl="vmap"), rngs=nnx.Rngs(0))
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))
    a, b = model(src, tgt), model(src, tgt)
    assert not np.allclose(a, b)  # fresh dropout masks each call
    model.eval()
    np.testing.assert_array_equal(model(src, tgt), model(src, tgt))
    model.train()
    assert not np.allclose(model(src, tgt), model(src, tgt))


def test_remat_gives_the_same_gradients(rng):
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))

    def grads(config):
        model = Transformer(config, rngs=nnx.Rngs(0))
        loss = lambda m: (m(src, tgt) ** 2).mean()  # noqa: E731
        return jax.tree.leaves(nnx.grad(loss)(model))

    for a, b in zip(grads(TINY), grads(TINY.replace(remat=True))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(norm="pre", remat=True)])
def test_scan_layers_runs_the_same_function_on_the_same_parameters(rng, overrides):
    """scan_layers changes only how the layers run: one `scan` per stack, the loop's parameter
    tree (so checkpoints load either way), and the loop's outputs, gradients and dropout
    masks, call after call (the dropout streams advance in both)."""
    config = TINY.replace(dropout_rate=0.2, **overrides)  # 2 + 2 layers
    loop = Transformer(config, rngs=nnx.Rngs(0))
    scan = Transformer(config.replace(scan_layers=True), rngs=nnx.Rngs(0))
    assert (jax.tree.structure(nnx.state(scan, nnx.Param))
            == jax.tree.structure(nnx.state(loop, nnx.Param)))
    src, tgt = tokens(rng, (2, 6), pad_from=[6, 4]), tokens(rng, (2, 5))

    def scans(model):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(src, tgt))(state).jaxpr
        return sum(eqn.primitive.name == "scan" for eqn in jaxpr_equations(jaxpr))

    assert (scans(scan), scans(loop)) == (2, 0)
    value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: (m(src, tgt) ** 2).mean()))
    values = []
    for _ in range(2):  # the second call draws new masks in both models
        (value, grads), (expected, expected_grads) = value_and_grad(scan), value_and_grad(loop)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        values.append(value)
    assert values[0] != values[1]


def test_shared_embeddings_and_untied_output(rng):
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))
    for overrides in (dict(share_embeddings=True), dict(tie_output=False)):
        model = Transformer(TINY.replace(**overrides), rngs=nnx.Rngs(0))
        assert model(src, tgt).shape == (2, 5, 32)


def test_gradients_flow_to_every_parameter(rng):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    src, tgt = tokens(rng, (2, 6), pad_from=[6, 4]), tokens(rng, (2, 5))
    grads = nnx.grad(lambda m: m(src, tgt).std())(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads)):
        assert np.any(np.asarray(g) != 0), path


@pytest.mark.parametrize(
    "src,tgt,match",
    [
        (np.full((2, 5), 40), np.full((2, 4), 5), r"src_tokens holds token ids in \[40, 40\]"),
        (np.full((2, 5), 5), np.full((2, 4), -1), "tgt_tokens holds token ids"),
        (np.full((2, 5), 5), np.full((3, 4), 5), "batch sizes differ: 2 vs 3"),
        (np.full((2, 65), 5), np.full((2, 4), 5), "length 65 > max_len=64"),
        (np.full((5,), 5), np.full((2, 4), 5), r"src_tokens must be a \[batch, length\]"),
        (np.full((2, 5), 5.0), np.full((2, 4), 5), "integer token ids"),
    ],
)
def test_bad_inputs_raise_value_error(src, tgt, match):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        model(jnp.asarray(src), jnp.asarray(tgt))


def test_model_runs_under_jit_with_split_state(rng):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    src, tgt = tokens(rng, (2, 6)), tokens(rng, (2, 5))

    @jax.jit
    def forward(state, src, tgt):
        return nnx.merge(graphdef, state)(src, tgt)

    np.testing.assert_allclose(forward(state, src, tgt), model(src, tgt), rtol=1e-5, atol=1e-6)


def test_the_model_trains_with_flax_own_optimizer_under_nnx_jit():
    """The idiom of a user's own Flax code: nnx.Optimizer(model, tx, wrt=nnx.Param),
    nnx.value_and_grad and optimizer.update inside nnx.jit, dropout on (its stream advances
    inside the jitted step): the loss of a fixed batch of the copy task falls."""
    config = TINY.replace(src_vocab_size=20, tgt_vocab_size=20, dropout_rate=0.1)
    model = Transformer(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    src = jnp.concatenate([tokens(np.random.default_rng(1), (8, 5), vocab=20),
                           jnp.full((8, 1), 2, jnp.int32)], axis=1)  # symbols, then eos
    tgt_in = jnp.concatenate([jnp.ones((8, 1), jnp.int32), src[:, :-1]], axis=1)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model(src, tgt_in)
            return optax.softmax_cross_entropy_with_integer_labels(logits, src).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    first, second = model(src, tgt_in), model(src, tgt_in)  # train mode: fresh dropout masks
    assert not np.allclose(first, second)
    model.eval()
    np.testing.assert_array_equal(model(src, tgt_in), model(src, tgt_in))


def test_modules_refuse_a_config_that_is_not_one_and_attention_names_bad_inputs():
    config = TransformerConfig.preset("tiny")
    for module in (Transformer, Encoder, Decoder, EncoderLayer, DecoderLayer,
                   MultiHeadAttention, FeedForward):
        with pytest.raises(ValueError, match="config must be a TransformerConfig"):
            module(config.to_dict(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="preset"):
        TransformerConfig.preset(["tiny"])
    attention = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \[batch, length, d_model=32\]"):
        attention(jnp.ones((4, 32)))
    with pytest.raises(ValueError, match=r"context must be \[batch, length, d_model=32\]"):
        attention(jnp.ones((1, 4, 32)), jnp.ones((1, 4, 16)))


def test_a_model_with_dropout_needs_a_dropout_stream():
    with pytest.raises(ValueError, match="needs a 'dropout' random stream"):
        Transformer(TINY.replace(dropout_rate=0.1), rngs=nnx.Rngs(params=0))
    Transformer(TINY.replace(dropout_rate=0.1), rngs=nnx.Rngs(params=0, dropout=1))
    Transformer(TINY.replace(dropout_rate=0.0), rngs=nnx.Rngs(params=0))  # none needed
    attention_dropout = TINY.replace(attention_impl="vmap", attention_dropout_rate=0.2)
    with pytest.raises(ValueError, match="attention_dropout_rate=0.2 needs a 'dropout' random"):
        MultiHeadAttention(attention_dropout, rngs=nnx.Rngs(params=0))
    Transformer(attention_dropout, rngs=nnx.Rngs(params=0, dropout=1))


def test_encoder_and_decoder_stacks_default_to_no_padding():
    """Used on their own, the stacks need no mask: None means every position is real."""
    memory_in = jax.random.normal(jax.random.key(0), (2, 5, TINY.d_model))
    target_in = jax.random.normal(jax.random.key(1), (2, 3, TINY.d_model))
    everything = jnp.ones((2, 1, 1, 5), bool)
    for config in (TINY, TINY.replace(scan_layers=True)):
        encoder = Encoder(config, rngs=nnx.Rngs(0))
        decoder = Decoder(config, rngs=nnx.Rngs(1))
        memory = encoder(memory_in)
        close = dict(rtol=1e-5, atol=1e-6)  # the masked path compiles differently
        np.testing.assert_allclose(memory, encoder(memory_in, everything), **close)
        np.testing.assert_allclose(decoder(target_in, memory),
                                   decoder(target_in, memory, everything), **close)
        layer = EncoderLayer(config, rngs=nnx.Rngs(2))
        np.testing.assert_allclose(layer(memory_in), layer(memory_in, everything), **close)


def test_ids_outside_the_vocabulary_give_nan_under_jit_negative_ones_too():
    """Outside jit they are refused on the host; inside, where ids are not known, an id
    outside [0, V) must not read a real row (a negative one would wrap to the last)."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    run = jax.jit(lambda src, tgt: model(src, tgt))
    tgt = jnp.array([[1, 5]])
    assert np.isfinite(run(jnp.array([[5, 6, 2]]), tgt)).all()
    for bad in (TINY.src_vocab_size, -1):
        assert not np.isfinite(run(jnp.array([[5, 6, bad]]), tgt)).all()
