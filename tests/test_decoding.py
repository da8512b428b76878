"""Decoding: KV-cached vs uncached greedy, sampling, beam search, EOS handling, validation.

Models are random and small (one encoder layer, two decoder layers, d_model 16); tests reuse
one config and one max_len so the compiled decoding loops are shared between them.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_transformer import EOS_ID, PAD_ID, Transformer, TransformerConfig
from flax_transformer.decoding import (
    beam_search,
    filter_logits,
    gnmt_length_penalty,
    greedy_decode,
    sample_decode,
)
from flax_transformer.decoding.beam import _compiled_beam_search
from flax_transformer.decoding.search import _compiled_search
from flax_transformer.kernels import padding_mask

# Dropout is on (training mode): decoding must switch it off without touching the model.
CONFIG = TransformerConfig.preset("tiny", d_model=16, num_heads=2, d_ff=32,
                                  num_encoder_layers=1, num_decoder_layers=2,
                                  dropout_rate=0.1, max_len=16)
MAX_LEN = 8
# Three sources of lengths 6, 4 and 2, padded to 6.
SRC = np.array([[5, 6, 7, 8, 9, 10], [9, 4, 5, 6, 0, 0], [11, 12, 0, 0, 0, 0]], np.int32)


def model_for(seed=0, **overrides):
    return Transformer(CONFIG.replace(**overrides), rngs=nnx.Rngs(seed))


def assert_well_formed(tokens):
    """No pad before the first eos; only pad after it."""
    for row in np.asarray(tokens).reshape(-1, tokens.shape[-1]):
        eos = np.flatnonzero(row == EOS_ID)
        end = eos[0] + 1 if eos.size else len(row)
        assert np.all(row[:end] != PAD_ID), row
        assert np.all(row[end:] == PAD_ID), row


def truncate_after_eos(tokens):
    out = np.array(tokens)
    for row in out:
        eos = np.flatnonzero(row == EOS_ID)
        if eos.size:
            row[eos[0] + 1:] = PAD_ID
    return out


def test_decode_step_equals_full_decoder(rng):
    """Teacher-forced: step t of the cache API gives the logits of position t of `decode`."""
    graphdef, state = nnx.split(model_for(0, dropout_rate=0.0))
    tgt = jnp.asarray(np.c_[np.ones((3, 1)), rng.integers(4, 32, (3, 4))], jnp.int32)
    src = jnp.asarray(SRC)

    @jax.jit
    def both(state, src, tgt):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(model.encode(src), padding_mask(src), MAX_LEN)

        def step(cache, t):  # t is a traced position, as in the decoding loops
            logits, cache = model.decode_step(
                jax.lax.dynamic_slice_in_dim(tgt, t, 1, axis=1), t, cache)
            return cache, logits

        _, steps = jax.lax.scan(step, cache, jnp.arange(tgt.shape[1]))
        return jnp.swapaxes(steps, 0, 1), model(src, tgt)

    steps, full = both(state, src, tgt)
    np.testing.assert_allclose(steps, full, atol=1e-5, rtol=1e-5)


def test_beams_share_one_copy_of_the_memory(rng):
    """init_cache(memory, mask, L, beams=K): each input's K decoder rows (b*K + j) attend to
    one projected copy of its memory, and decode exactly as with the memory repeated K times."""
    graphdef, state = nnx.split(model_for(0, dropout_rate=0.0))
    src, beams = jnp.asarray(SRC), 3
    tgt = jnp.asarray(np.c_[np.ones((9, 1)), rng.integers(4, 32, (9, 4))], jnp.int32)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        memory, mask = model.encode(src), padding_mask(src)
        shared = model.init_cache(memory, mask, MAX_LEN, beams=beams)
        repeated = model.init_cache(jnp.repeat(memory, beams, 0), jnp.repeat(mask, beams, 0),
                                    MAX_LEN)

        def step(caches, t):
            token = jax.lax.dynamic_slice_in_dim(tgt, t, 1, axis=1)
            out = [model.decode_step(token, t, cache) for cache in caches]
            return tuple(c for _, c in out), tuple(logits for logits, _ in out)

        caches, logits = jax.lax.scan(step, (shared, repeated), jnp.arange(tgt.shape[1]))
        return caches[0], logits

    cache, (shared, repeated) = run(state)
    np.testing.assert_allclose(shared, repeated, atol=1e-5, rtol=1e-5)
    assert not np.allclose(shared[:, 0], shared[:, 1])  # the beams' rows really differ
    heads = CONFIG.num_heads
    for layer in cache.layers:
        assert layer.cross_attention.key.shape[0] == 3 * heads  # one copy per input
        assert layer.self_attention.value.shape[0] == 3 * beams * heads
    assert cache.src_mask.shape == (3, 1, 1, SRC.shape[1])


def test_decode_step_and_decode_refuse_bad_arguments():
    model = model_for(0)
    src = jnp.asarray(SRC)
    memory = model.encode(src)
    cache = model.init_cache(memory, padding_mask(src), 4)
    beam_cache = model.init_cache(memory, padding_mask(src), 4, beams=2)
    token = jnp.full((3, 1), 5, jnp.int32)
    bad = [
        (lambda: model.decode_step(token, 4, cache), "position 4 is outside the cache's 4"),
        (lambda: model.decode_step(token, -1, cache), "position -1 is outside"),
        (lambda: model.decode_step(token[:2], 0, cache), "token has batch 2 but the cache"),
        (lambda: model.decode_step(token + 40, 0, cache), "token holds token ids in"),
        (lambda: model.decode(token, memory[..., :8], None), r"d_model=16\]"),
        (lambda: model.init_cache(memory[..., :8], None, 4), r"d_model=16\]"),
        (lambda: model.init_cache(memory, None, 4, beams=0), "beams must be an integer >= 1"),
        (lambda: model.init_cache(memory, None, 4, beams=2.0), "beams must be an integer"),
        (lambda: model.init_cache(memory, padding_mask(src[:2]), 4), "src_mask has batch 2"),
        (lambda: model.decode_step(token, 0, beam_cache), "token has batch 3 but the cache "
                                                          "was built for 6 rows"),
        (lambda: model.decoder.layers[0].cross_attention.cross_attend_step(
            jnp.zeros((4, 1, 16)), cache.layers[0].cross_attention, None),
         "4 decoder rows do not divide among the 3 inputs"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    model.decode_step(token, 3, cache)  # the last slot is fine
    model.decode_step(jnp.repeat(token, 2, 0), 0, beam_cache)  # two rows per input


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_greedy_equals_uncached(norm):
    for seed in range(3):
        model = model_for(seed, norm=norm)
        cached, cached_logits = greedy_decode(model, SRC, max_len=MAX_LEN, return_logits=True)
        plain, plain_logits = greedy_decode(model, SRC, max_len=MAX_LEN, use_cache=False,
                                            return_logits=True)
        np.testing.assert_array_equal(cached, plain)
        np.testing.assert_allclose(cached_logits, plain_logits, atol=1e-5, rtol=0)
        assert cached.shape[0] == 3 and cached.shape[1] <= MAX_LEN
        assert_well_formed(cached)


@pytest.mark.parametrize("switch", ["remat", "scan_layers"])
def test_a_model_with_a_layer_switch_decodes_like_the_same_model_without_it(switch):
    """remat and scan_layers change how training runs the layers, not their function. Every
    search runs inside a loop over a model merged outside it: there the layers run plainly
    (nnx.remat cannot run in such a loop), and scanned stacks write no dropout stream back
    (dropout is off while decoding; the model has some)."""
    plain, switched = model_for(0), model_for(0, **{switch: True})
    for use_cache in (True, False):
        np.testing.assert_array_equal(
            greedy_decode(switched, SRC, max_len=MAX_LEN, use_cache=use_cache),
            greedy_decode(plain, SRC, max_len=MAX_LEN, use_cache=use_cache))
    np.testing.assert_array_equal(beam_search(switched, SRC, beam_size=2, max_len=MAX_LEN)[0],
                                  beam_search(plain, SRC, beam_size=2, max_len=MAX_LEN)[0])
    if switch == "remat":
        assert switched.decoder.remat and switched.encoder.remat  # the model is unchanged


def test_decoding_leaves_the_model_in_training_mode():
    model = model_for(0)
    first = greedy_decode(model, SRC, max_len=MAX_LEN)
    np.testing.assert_array_equal(greedy_decode(model, SRC, max_len=MAX_LEN), first)
    assert model.embed_dropout.deterministic is False
    assert model.decoder.layers[0].add_norm_1.dropout.deterministic is False


def test_repeated_calls_do_not_recompile():
    greedy_decode(model_for(0), SRC, max_len=MAX_LEN)
    misses = _compiled_search.cache_info().misses
    sizes = [f._cache_size() for f in _cached_functions()]
    greedy_decode(model_for(1), SRC, max_len=MAX_LEN)  # new weights, same structure
    assert _compiled_search.cache_info().misses == misses
    assert [f._cache_size() for f in _cached_functions()] == sizes


def test_a_model_in_train_mode_shares_the_eval_modes_compiled_search():
    """Decoding runs a model in eval mode, so the mode a caller left it in selects no other
    compiled loop: a training run that decodes its validation set between steps, and then
    the eval-mode model, compile each search once."""
    from flax_transformer.decoding import sequence_log_probs
    from flax_transformer.decoding.score import _compiled_scorer

    model = model_for(0)
    tgt = np.array([[5, 6, EOS_ID], [7, EOS_ID, PAD_ID], [5, 5, EOS_ID]], np.int32)
    train_mode = (greedy_decode(model, SRC, max_len=MAX_LEN),
                  beam_search(model, SRC, beam_size=2, max_len=MAX_LEN)[0],
                  sequence_log_probs(model, SRC, tgt))
    caches = (_compiled_search, _compiled_beam_search, _compiled_scorer)
    misses = [c.cache_info().misses for c in caches]
    eval_view = nnx.view(model, deterministic=True)
    model.eval()  # in place, as a caller switching modes does
    for other in (eval_view, model):
        outputs = (greedy_decode(other, SRC, max_len=MAX_LEN),
                   beam_search(other, SRC, beam_size=2, max_len=MAX_LEN)[0],
                   sequence_log_probs(other, SRC, tgt))
        for got, want in zip(outputs, train_mode):
            np.testing.assert_array_equal(got, want)
    assert [c.cache_info().misses for c in caches] == misses


def _cached_functions():
    # lru_cache keeps no public list of values; rebuild the greedy entry (a cache hit).
    from flax_transformer.decoding.common import split_model

    graphdef, _ = split_model(model_for(0))
    return [_compiled_search(graphdef, MAX_LEN, True, False, None, False, False, None)]


def test_padded_sources_decode_like_unpadded():
    model = model_for(0)
    base = greedy_decode(model, SRC, max_len=MAX_LEN)  # rows padded to 6
    alone = greedy_decode(model, SRC[1:2, :4], max_len=MAX_LEN)  # row 1 without its padding
    np.testing.assert_array_equal(alone[0], base[1, : alone.shape[1]])
    assert np.all(base[1, alone.shape[1]:] == PAD_ID)


def test_beam_size_one_equals_greedy():
    model = model_for(0)
    greedy = greedy_decode(model, SRC, max_len=MAX_LEN)
    tokens, scores = beam_search(model, SRC, beam_size=1, max_len=MAX_LEN, length_penalty=0.0)
    np.testing.assert_array_equal(tokens, greedy)
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    # Stopping at the first finished hypothesis is greedy whatever the length penalty.
    tokens, _ = beam_search(model, SRC, beam_size=1, max_len=MAX_LEN, length_penalty=0.6,
                            early_stopping=True)
    np.testing.assert_array_equal(tokens, greedy)


@pytest.mark.parametrize("seeds", [(3,), (3, 4)], ids=["one model", "an ensemble of two"])
def test_beam_search_finds_the_exhaustive_optimum(seeds):
    """Vocabulary {eos, 3, 4} (+ pad, bos), 3 tokens: 15 hypotheses, at most 12 candidates a
    step; a beam of 12 must return the best by exhaustive enumeration, and the 12 best. An
    ensemble scores each token by the log of the mean of its models' probabilities."""
    max_len, words = 3, (EOS_ID, 3, 4)
    models = [Transformer(CONFIG.replace(src_vocab_size=8, tgt_vocab_size=5),
                          rngs=nnx.Rngs(seed)) for seed in seeds]
    src = np.array([[4, 5, 6, 7], [7, 5, 0, 0]], np.int32)
    hypotheses = [h for n in range(1, max_len + 1) for h in itertools.product(words, repeat=n)
                  if EOS_ID not in h[:-1] and (h[-1] == EOS_ID or n == max_len)]
    assert len(hypotheses) == 15
    tgt = np.zeros((len(hypotheses), max_len), np.int32)
    target = np.zeros_like(tgt)
    for i, h in enumerate(hypotheses):
        tgt[i, : len(h)] = (1,) + h[:-1]
        target[i, : len(h)] = h
    lengths = np.array([len(h) for h in hypotheses])
    references = [jax.jit(nnx.view(m, deterministic=True).__call__) for m in models]
    exact = []
    for b in range(2):
        probs = []  # float64 probabilities of each model, [N, T, V]
        for reference in references:
            logits = reference(jnp.asarray(np.repeat(src[b:b + 1], len(tgt), 0)),
                               jnp.asarray(tgt))
            logp = jax.nn.log_softmax(logits.at[..., :2].set(-jnp.inf), axis=-1)  # no pad, bos
            probs.append(np.exp(np.asarray(logp, np.float64)))
        with np.errstate(divide="ignore"):  # pad and bos: probability 0
            mixture = np.log(np.mean(probs, axis=0))
        picked = np.take_along_axis(mixture, target[..., None], -1)[..., 0]
        exact.append(np.where(np.arange(max_len) < lengths[:, None], picked, 0).sum(-1))
    decoded = models[0] if len(models) == 1 else models
    for alpha in (0.0, 0.6, 2.0, -0.5):
        tokens, scores = beam_search(decoded, src, beam_size=12, max_len=max_len,
                                     length_penalty=alpha, return_all_beams=True)
        assert_well_formed(tokens)
        for b in range(2):
            score = exact[b] / gnmt_length_penalty(lengths, alpha)
            order = np.argsort(-score)
            best = np.zeros(max_len, np.int32)
            best[: lengths[order[0]]] = hypotheses[order[0]]
            np.testing.assert_array_equal(np.pad(tokens[b, 0], (0, max_len - tokens.shape[2])),
                                          best)
            np.testing.assert_allclose(scores[b], score[order[:12]], rtol=1e-5, atol=1e-5)


def test_an_ensemble_of_one_or_of_copies_decodes_like_the_model():
    model, other = model_for(0), model_for(1)
    alone = beam_search(model, SRC, beam_size=3, max_len=MAX_LEN, return_all_beams=True)
    one = beam_search([model], SRC, beam_size=3, max_len=MAX_LEN, return_all_beams=True)
    copies = beam_search((model, model), SRC, beam_size=3, max_len=MAX_LEN,
                         return_all_beams=True)
    for tokens, scores in (one, copies):
        np.testing.assert_array_equal(tokens, alone[0])
        np.testing.assert_allclose(scores, alone[1], rtol=1e-5)
    np.testing.assert_array_equal(one[1], alone[1])  # one model: the same computation
    pair = beam_search([model, other], SRC, beam_size=3, max_len=MAX_LEN, return_all_beams=True)
    assert_well_formed(pair[0])
    assert not np.allclose(pair[1], alone[1])  # a second model changes the scores
    # another pair of the same structure reuses the compiled search
    misses = _compiled_beam_search.cache_info().misses
    beam_search([model_for(2), model_for(3)], SRC, beam_size=3, max_len=MAX_LEN)
    assert _compiled_beam_search.cache_info().misses == misses


def test_ensembles_refuse_models_that_do_not_fit_together():
    model = model_for(0)
    with pytest.raises(ValueError, match="at least one model"):
        beam_search([], SRC, max_len=4)
    with pytest.raises(ValueError, match="target vocabularies of sizes"):
        beam_search([model, model_for(0, tgt_vocab_size=20)], SRC, max_len=4)
    with pytest.raises(ValueError, match="must be a flax_transformer Transformer"):
        beam_search([model, "model"], SRC, max_len=4)
    with pytest.raises(ValueError, match="TransformerConfig.max_len=8"):
        beam_search([model, model_for(0, max_len=8)], SRC, max_len=10)
    with pytest.raises(ValueError, match=r"ensemble member 1 \(of 2\): src_tokens holds token ids"):
        beam_search([model, model_for(0, src_vocab_size=10)], SRC, max_len=4)
    with pytest.raises(ValueError, match=r"ensemble member 2 \(of 3\): max_len=10 exceeds"):
        beam_search([model, model, model_for(0, max_len=8)], SRC, max_len=10)


def test_an_input_done_early_keeps_its_result_whatever_its_batch():
    """early_stopping=True: an input is done at its K-th finished hypothesis; the steps that
    the batch's other inputs still take must not change its result (a small vocabulary
    makes eos likely, so inputs finish at different steps)."""
    model = model_for(2, tgt_vocab_size=6)
    options = dict(beam_size=2, max_len=MAX_LEN, early_stopping=True, return_all_beams=True)
    batch_tokens, batch_scores = beam_search(model, SRC, **options)
    for row in range(len(SRC)):
        tokens, scores = beam_search(model, SRC[row:row + 1], **options)
        np.testing.assert_allclose(scores[0], batch_scores[row], rtol=1e-5)
        width = tokens.shape[-1]
        np.testing.assert_array_equal(tokens[0], batch_tokens[row, :, :width])
        assert np.all(batch_tokens[row, :, width:] == PAD_ID)


def test_step_logits_after_a_rows_eos_are_zeros_whatever_its_batch():
    model = model_for(4, tgt_vocab_size=6)  # its rows end after 8, 3 and 1 tokens
    tokens, logits = greedy_decode(model, SRC, max_len=MAX_LEN, return_logits=True)
    lengths = [int(np.flatnonzero(row == EOS_ID)[0]) + 1 if EOS_ID in row else len(row)
               for row in tokens]
    assert len(set(lengths)) > 1  # rows end at different steps
    for row, length in enumerate(lengths):
        assert np.all(logits[row, length:] == 0) and np.all(logits[row, :length] != 0)
        alone, alone_logits = greedy_decode(model, SRC[row:row + 1], max_len=MAX_LEN,
                                            return_logits=True)
        np.testing.assert_allclose(alone_logits[0], logits[row, :alone.shape[1]], atol=1e-5)


def test_decoding_inside_jit_is_refused_with_a_clear_error():
    model = model_for(0)
    with pytest.raises(ValueError, match="src_tokens is traced.*call it outside jit"):
        jax.jit(lambda src: greedy_decode(model, src, max_len=4))(jnp.asarray(SRC))


def test_sampling_top_k_one_is_greedy():
    model = model_for(0)
    greedy = greedy_decode(model, SRC, max_len=MAX_LEN)
    sampled = sample_decode(model, SRC, rng=jax.random.key(7), max_len=MAX_LEN, top_k=1,
                            temperature=0.5)
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_is_reproducible_and_stops_at_eos():
    """Tiny vocabulary, so eos is drawn often: rows end at different steps."""
    model = model_for(0, tgt_vocab_size=5)
    src = np.array([[5, 6, 7], [8, 9, 0], [10, 0, 0]], np.int32)
    outputs = []
    for seed in range(20):
        key = jax.random.key(seed)
        out = sample_decode(model, src, rng=key, max_len=MAX_LEN)
        assert_well_formed(out)
        np.testing.assert_array_equal(sample_decode(model, src, rng=key, max_len=MAX_LEN), out)
        outputs.append(out)
        # Same draws with eos ignored: the rows agree up to their eos, then pad.
        free = sample_decode(model, src, rng=key, max_len=MAX_LEN, ignore_eos=True)
        assert free.shape == (3, MAX_LEN)
        np.testing.assert_array_equal(truncate_after_eos(free)[:, : out.shape[1]], out)
        ends = [np.flatnonzero(r == EOS_ID)[:1] for r in free]
        if all(e.size for e in ends) and len({int(e[0]) for e in ends}) > 1:
            assert out.shape[1] < MAX_LEN  # every row finished early: the loop stopped
            break
    else:
        pytest.fail("no seed made every row stop at eos at different steps")
    outputs += [sample_decode(model, src, rng=jax.random.key(100 + s), max_len=MAX_LEN)
                for s in range(4)]
    assert len({o.tobytes() for o in outputs}) > 1  # different keys, different samples


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, temperature=1.0, top_k=2)) == [1, 1, 0, 0, 0]
    assert kept(filter_logits(logits, temperature=1.0, top_p=0.5)) == [1, 0, 0, 0, 0]
    assert kept(filter_logits(logits, temperature=1.0, top_p=0.6)) == [1, 1, 0, 0, 0]
    assert kept(filter_logits(logits, temperature=1.0, top_p=0.86)) == [1, 1, 1, 1, 0]
    assert kept(filter_logits(logits, temperature=2.0, top_k=9, top_p=1.0)) == [1] * 5
    np.testing.assert_allclose(filter_logits(logits, temperature=2.0),
                               (logits - jnp.log(0.5)) / 2, rtol=1e-6)  # the largest at 0


@pytest.mark.parametrize("call, match", [
    (lambda m: greedy_decode(m, SRC, max_len=0), "max_len must be >= 1"),
    (lambda m: greedy_decode(m, SRC, max_len=17), "TransformerConfig.max_len"),
    (lambda m: greedy_decode(m, SRC + 30, max_len=4), "src_tokens holds token ids"),
    (lambda m: greedy_decode(m, SRC - 1, max_len=4), "src_tokens holds token ids"),
    (lambda m: greedy_decode(m, SRC.astype(float), max_len=4), "integer token ids"),
    (lambda m: greedy_decode(m, SRC[0], max_len=4), r"src_tokens must be a \[batch, length\]"),
    (lambda m: beam_search(m, SRC, beam_size=0, max_len=4), "beam_size"),
    (lambda m: beam_search(m, SRC, max_len=4, length_penalty=float("nan")), "length_penalty"),
    (lambda m: sample_decode(m, SRC, rng=jax.random.key(0), max_len=4, temperature=0.0),
     "temperature must be > 0"),
    (lambda m: sample_decode(m, SRC, rng=jax.random.key(0), max_len=4, temperature=-1),
     "temperature must be > 0"),
    (lambda m: sample_decode(m, SRC, rng=jax.random.key(0), max_len=4, top_k=0), "top_k"),
    (lambda m: sample_decode(m, SRC, rng=jax.random.key(0), max_len=4, top_p=0.0), "top_p"),
    (lambda m: sample_decode(m, SRC, rng="seed", max_len=4), "rng must be"),
    (lambda m: m.init_cache(m.encode(jnp.asarray(SRC)), None, 17), "max_len"),
    (lambda m: m.init_cache(m.encode(jnp.asarray(SRC)), None, True), "max_len"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(model_for(0))


def test_first_argmax_matches_jnp_argmax():
    from flax_transformer.decoding.common import first_argmax

    x = np.random.default_rng(0).normal(size=(4, 3, 50)).astype(np.float32)
    x[0, 0, [7, 9]] = 10.0  # ties: the first index wins
    x[1, 2, [3, 30]] = np.nan  # NaN: the first NaN, as jnp.argmax
    x[2, 1] = -np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1))


def test_sampling_at_a_tiny_temperature_is_greedy():
    model = model_for()
    greedy = greedy_decode(model, SRC, max_len=MAX_LEN)
    cold = sample_decode(model, SRC, rng=jax.random.key(3), max_len=MAX_LEN, temperature=2e-38)
    np.testing.assert_array_equal(cold, greedy)
    # Below float32's smallest normal number the division would give NaN: refused.
    with pytest.raises(ValueError, match="below float32's smallest normal number"):
        sample_decode(model, SRC, rng=jax.random.key(3), max_len=MAX_LEN, temperature=1e-38)
    with pytest.raises(ValueError, match="below float32's smallest normal number"):
        filter_logits(jnp.array([1.0, 0.5]), temperature=1e-46)


def test_filter_logits_checks_concrete_arguments():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    for kwargs, message in [(dict(temperature=0.0), "temperature must be > 0"),
                            (dict(temperature=-1.0), "temperature must be > 0"),
                            (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
                            (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
                            (dict(temperature=1.0, top_p=2.0), r"top_p must be in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            filter_logits(logits, **kwargs)
    cold = np.asarray(filter_logits(logits, temperature=1e-30, top_k=2))
    assert np.isneginf(cold).tolist() == [[True, False, False]]  # top_k's cut
    assert cold[0, 2] == 0.0 and not np.isnan(cold).any()  # no overflow to +inf


def test_boolean_options_must_be_booleans():
    model = model_for()
    with pytest.raises(ValueError, match="ignore_eos must be True or False"):
        greedy_decode(model, SRC, max_len=MAX_LEN, ignore_eos="no")
    with pytest.raises(ValueError, match="use_cache must be True or False"):
        sample_decode(model, SRC, rng=0, max_len=MAX_LEN, use_cache=None)
    with pytest.raises(ValueError, match="early_stopping must be True or False"):
        beam_search(model, SRC, max_len=MAX_LEN, early_stopping="x")
    with pytest.raises(ValueError, match="return_all_beams must be True or False"):
        beam_search(model, SRC, max_len=MAX_LEN, return_all_beams=1)


def test_decode_step_checks_concrete_positions_and_init_cache_its_mask():
    model = model_for(dropout_rate=0.0)
    src = jnp.asarray(SRC)
    memory, mask = model.encode(src), padding_mask(src)
    cache = model.init_cache(memory, mask, 4)
    token = jnp.ones((3, 1), jnp.int32)
    with pytest.raises(ValueError, match="position 10 is outside the cache's 4"):
        model.decode_step(token, jnp.int32(10), cache)
    for position in (1.0, None, jnp.float32(1), True):
        with pytest.raises(ValueError, match="position must be an integer"):
            model.decode_step(token, position, cache)
    logits, _ = model.decode_step(token, jnp.int32(0), cache)
    np.testing.assert_array_equal(np.asarray(logits),
                                  np.asarray(model.decode_step(token, 0, cache)[0]))
    with pytest.raises(ValueError, match="mask"):
        model.init_cache(memory, mask[:, :, :, :3], 4)  # the wrong source length
    with pytest.raises(ValueError, match="mask"):
        model.init_cache(memory, mask[:, 0, 0], 4)  # [B, S], not [B, 1, 1, S]
    with pytest.raises(ValueError, match="mask must be boolean"):
        model.init_cache(memory, mask.astype(jnp.int32), 4)


def test_row_max_len_stops_each_row_as_if_decoded_alone():
    """row_max_len caps each row on its own: a row's output (greedy, beam) is the one it gets
    decoded alone with max_len = its cap, whatever its batch-mates' caps. (A sampled row's
    draws depend on the batch's shape, so sampling is only checked to keep the caps.)"""
    model = model_for(3)
    caps = np.array([2, 8, 5], np.int32)
    greedy = greedy_decode(model, SRC, max_len=MAX_LEN, row_max_len=caps, ignore_eos=True)
    sampled = sample_decode(model, SRC, rng=7, max_len=MAX_LEN, row_max_len=caps,
                            ignore_eos=True)
    assert (sampled != PAD_ID).sum(axis=1).tolist() == caps.tolist()
    best, scores = beam_search(model, SRC, beam_size=3, max_len=MAX_LEN, row_max_len=caps)
    assert (greedy != PAD_ID).sum(axis=1).tolist() == caps.tolist()  # eos ignored: full caps
    for row, cap in enumerate(caps):
        source = SRC[row:row + 1]
        alone = greedy_decode(model, source, max_len=int(cap), ignore_eos=True)[0]
        np.testing.assert_array_equal(greedy[row, :len(alone)], alone)
        assert np.all(greedy[row, len(alone):] == PAD_ID)
        alone, alone_score = beam_search(model, source, beam_size=3, max_len=int(cap))
        np.testing.assert_array_equal(best[row, :alone.shape[1]], alone[0])
        assert np.all(best[row, alone.shape[1]:] == PAD_ID)
        np.testing.assert_allclose(scores[row], alone_score[0], rtol=1e-5)
    # None is max_len for every row
    np.testing.assert_array_equal(
        greedy_decode(model, SRC, max_len=MAX_LEN, row_max_len=[MAX_LEN] * 3),
        greedy_decode(model, SRC, max_len=MAX_LEN))


@pytest.mark.parametrize("caps, match", [
    ([2, 3], r"one integer per source row \(3\)"),
    ([2.0, 3.0, 4.0], "one integer per source row"),
    ([0, 3, 4], r"in \[1, max_len=8\]"),
    ([2, 9, 4], r"in \[1, max_len=8\], got values in \[2, 9\]"),
])
def test_bad_row_max_len_is_refused(caps, match):
    model = model_for(0)
    for decode in (lambda **kw: greedy_decode(model, SRC, max_len=MAX_LEN, **kw),
                   lambda **kw: beam_search(model, SRC, max_len=MAX_LEN, **kw)):
        with pytest.raises(ValueError, match=match):
            decode(row_max_len=caps)
