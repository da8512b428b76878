"""Beam search with the GNMT length penalty, the beams folded into the batch.

Search space: every token sequence that ends with eos within `max_len` tokens, plus every
sequence of exactly `max_len` tokens without eos (truncated hypotheses). A hypothesis of
`n` tokens (eos included) with log-probability `logp` scores

    score = logp / lp(n),    lp(n) = ((5 + n) / 6) ** alpha    (Wu et al., 2016)

where the log-probabilities exclude pad and bos (they are never generated, see
`suppress_special`).

Each step expands the `K` live beams of every input to K x V candidates and keeps the 2K
most probable. Among those, a candidate ending in eos (or any candidate at the last step)
is finished only if it ranks in the top K, as in fairseq. The K best finished hypotheses by
score are kept; the K best unfinished candidates become the next live beams, and their
self-attention caches are gathered from their parents. An input is done when it has K
finished hypotheses and no live beam can still beat the worst of them
(`early_stopping=False`, the default), or as soon as it has K finished hypotheses
(`early_stopping=True`); from then on its hypotheses are frozen, so its result does not
depend on the other inputs of the batch. The loop stops when every input is done or at
`max_len`; with `row_max_len`, each input stops at its own. beam_size=1 with
early_stopping=True (or length_penalty=0) is greedy decoding; with a length penalty and
early_stopping=False the one beam may go on past greedy's eos and find a longer hypothesis
that scores better.

An ensemble (a list of models) runs every model's decoder on the same beams, each with its
own cache, and gives each candidate token the log of the mean of the models' probabilities.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..kernels import padding_mask
from ..nn import BOS_ID, EOS_ID
from ..parallel import RowSplit
from .common import (
    NEG_INF,
    check_bool,
    check_max_len,
    check_model,
    check_positive_int,
    check_real,
    check_row_max_len,
    merge_for_decoding,
    prepare_source,
    split_model,
    suppress_special,
    trim,
)


def gnmt_length_penalty(length, alpha):
    """GNMT length normaliser lp(n) = ((5 + n) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, ...], index [B, K] -> x[b, index[b, k], ...] as [B, K, ...]"""
    return jax.vmap(lambda row, i: row[i])(x, index)


def _reorder_self_caches(cache, rows: jax.Array):
    """Rows [B*K] of every self-attention buffer ([B*K*H, ...], see KVCache); the memory
    keys/values are kept once per input, shared by its beams, so they are not touched."""

    def take(x):
        per_row = x.reshape(rows.shape[0], -1, *x.shape[1:])
        return per_row[rows].reshape(x.shape)

    layers = tuple(
        layer._replace(self_attention=jax.tree.map(take, layer.self_attention))
        for layer in cache.layers
    )
    return cache._replace(layers=layers)


def _next_token_log_probs(models, current, t, caches):
    """log p(next token) [B*K, V] and the updated caches: one model's, or for an ensemble
    the log of the mean of the models' probabilities."""
    logps, caches = zip(*(
        (jax.nn.log_softmax(suppress_special(logits)), cache)
        for logits, cache in (m.decode_step(current, t, c) for m, c in zip(models, caches))))
    if len(logps) == 1:
        return logps[0], caches
    return jax.nn.logsumexp(jnp.stack(logps), axis=0) - np.log(len(logps)), caches


@functools.lru_cache(maxsize=64)
def _compiled_beam_search(graphdefs: tuple, beam_size: int, max_len: int,
                          split: RowSplit | None):
    k = beam_size

    def run(states, src, limits, alpha, early_stopping):
        models = [merge_for_decoding(g, s) for g, s in zip(graphdefs, states)]
        batch, vocab = src.shape[0], models[0].config.tgt_vocab_size
        # The encoder runs once per input, and its keys/values are projected and kept once:
        # the K beams of input b (rows b*K+j) attend to them together.
        mask = padding_mask(src)
        cache = tuple(m.init_cache(m.encode(src), mask, max_len, beams=k) for m in models)
        live_tokens = jnp.zeros((batch, k, max_len + 1), jnp.int32).at[:, :, 0].set(BOS_ID)
        # All beams start identical: only beam 0 is live, or the first step would pick K copies.
        live_logp = jnp.full((batch, k), NEG_INF).at[:, 0].set(0.0)
        done_tokens = jnp.zeros((batch, k, max_len), jnp.int32)
        done_scores = jnp.full((batch, k), NEG_INF)

        def inputs_done(t, live_logp, done_scores):
            """[B]: the inputs whose K finished hypotheses nothing live can still change, and
            those past their own length limit."""
            worst_done = done_scores[:, -1]
            full = worst_done > NEG_INF
            # A live hypothesis only loses log-probability as it grows; its best possible
            # score divides by the largest length penalty still reachable.
            best_lp = jnp.maximum(gnmt_length_penalty(t + 1.0, alpha),
                                  gnmt_length_penalty(limits.astype(jnp.float32), alpha))
            hopeless = live_logp[:, 0] / best_lp <= worst_done
            return (full & (early_stopping | hopeless)) | (t >= limits)

        def body(carry):
            t, live_tokens, live_logp, cache, done_tokens, done_scores = carry
            frozen = inputs_done(t, live_logp, done_scores)  # kept as they are
            old_tokens, old_scores = done_tokens, done_scores
            current = jax.lax.dynamic_slice_in_dim(live_tokens, t, 1, axis=2)
            logp, cache = _next_token_log_probs(models, current.reshape(batch * k, 1), t, cache)
            logp = logp.reshape(batch, k, vocab)
            candidates = (live_logp[..., None] + logp).reshape(batch, k * vocab)
            cand_logp, flat = jax.lax.top_k(candidates, 2 * k)  # [B, 2K], best first
            parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
            cand_tokens = jax.lax.dynamic_update_slice(
                _gather_beams(live_tokens, parent), token[..., None], (0, 0, t + 1))

            # Finished: eos (or the input's last step) within the top K ranks.
            ends = (token == EOS_ID) | (t == limits[:, None] - 1)
            finishing = ends & (jnp.arange(2 * k) < k) & (cand_logp > NEG_INF)
            new_scores = jnp.where(finishing, cand_logp / gnmt_length_penalty(t + 1.0, alpha),
                                   NEG_INF)
            pool_scores = jnp.concatenate([done_scores, new_scores], axis=1)
            pool_tokens = jnp.concatenate([done_tokens, cand_tokens[:, :, 1:]], axis=1)
            done_scores, best = jax.lax.top_k(pool_scores, k)
            done_tokens = _gather_beams(pool_tokens, best)
            done_scores = jnp.where(frozen[:, None], old_scores, done_scores)
            done_tokens = jnp.where(frozen[:, None, None], old_tokens, done_tokens)

            # Live: the K most probable candidates that did not end in eos (none for a
            # frozen input, which then stays done).
            live_logp, best = jax.lax.top_k(jnp.where(token == EOS_ID, NEG_INF, cand_logp), k)
            live_logp = jnp.where(frozen[:, None], NEG_INF, live_logp)
            live_tokens = _gather_beams(cand_tokens, best)
            rows = (jnp.arange(batch)[:, None] * k + _gather_beams(parent, best)).reshape(-1)
            cache = tuple(_reorder_self_caches(c, rows) for c in cache)
            return t + 1, live_tokens, live_logp, cache, done_tokens, done_scores

        def not_done(carry):
            t, _, live_logp, _, _, done_scores = carry
            return (t < max_len) & ~jnp.all(inputs_done(t, live_logp, done_scores))

        start = (jnp.int32(0), live_tokens, live_logp, cache, done_tokens, done_scores)
        *_, done_tokens, done_scores = jax.lax.while_loop(not_done, body, start)
        return done_tokens, done_scores

    return jax.jit(run) if split is None else split.jit(run, row_args=(1, 2))


def beam_search(model, src_tokens, *, beam_size: int = 4, max_len: int,
                length_penalty: float = 0.6, early_stopping: bool = False,
                return_all_beams: bool = False, devices=None, row_max_len=None):
    """Beam search (see the module docstring for the exact rules).

    model: a `Transformer` (decoded in eval mode; the caller's model is not changed), or a
    sequence of them decoded as an ensemble: every step scores the next token by the log of
    the mean of their probabilities (they must share the target vocabulary size and read
    the same source ids);
    src_tokens: [B, S] int ids, 0 = padding; beam_size: K >= 1 hypotheses per input;
    max_len: tokens to generate at most (<= every model's config.max_len); length_penalty:
    alpha of the GNMT penalty (0 = raw log-probability); devices: None (the default device),
    or a list of devices that each search their share of the rows (e.g. jax.local_devices();
    see `flax_transformer.parallel.RowSplit`); row_max_len: None, or [B] ints in [1, max_len],
    each input's own max_len (its result is that of searching it alone with that max_len).

    Returns (tokens [B, L], scores [B]): per input the best hypothesis (without bos, eos
    included, pad after) and its length-normalised score; trailing all-pad columns trimmed.
    With return_all_beams=True: (tokens [B, K, L], scores [B, K]), best first; a slot that
    holds no hypothesis has score -inf.
    """
    models = ensemble_members(model)
    beam_size = check_positive_int(beam_size, "beam_size", "beam_size=1 with "
                                   "early_stopping=True is greedy search")
    for i, member in enumerate(models):
        with _naming_member(i, len(models)):
            max_len = check_max_len(member, max_len)
    alpha = check_real(length_penalty, "length_penalty")
    early_stopping = check_bool(early_stopping, "early_stopping")
    return_all_beams = check_bool(return_all_beams, "return_all_beams")
    split = RowSplit.of(devices)
    for i, member in enumerate(models[1:], start=1):
        with _naming_member(i, len(models)):
            prepare_source(member, src_tokens)  # the ids fit every member's vocabulary
    with _naming_member(0, len(models)):
        src = prepare_source(models[0], src_tokens)
    limits = check_row_max_len(row_max_len, src.shape[0], max_len)
    graphdefs, states = zip(*(split_model(member) for member in models))
    states, rows = tuple(states), src.shape[0]
    if split is not None:
        states, src, limits = split.put(states, src, limits)
    fn = _compiled_beam_search(tuple(graphdefs), beam_size, max_len, split)
    tokens, scores = fn(states, src, jnp.asarray(limits), jnp.float32(alpha),
                        jnp.bool_(early_stopping))
    tokens, scores = trim(np.asarray(tokens)[:rows]), np.asarray(scores)[:rows]
    if return_all_beams:
        return tokens, scores
    return trim(tokens[:, 0]), scores[:, 0]


@contextlib.contextmanager
def _naming_member(index: int, count: int):
    """A ValueError raised inside names the ensemble member it is about (when there are
    several)."""
    try:
        yield
    except ValueError as err:
        if count == 1:
            raise
        raise ValueError(f"ensemble member {index} (of {count}): {err}") from None


def ensemble_members(model) -> list:
    """[model] for one `Transformer`; the models of a non-empty list or tuple of them, checked
    to share a target vocabulary (ValueError otherwise)."""
    if not isinstance(model, (list, tuple)):
        check_model(model)
        return [model]
    if not model:
        raise ValueError("an ensemble needs at least one model, got an empty sequence")
    for member in model:
        check_model(member)
    sizes = [member.config.tgt_vocab_size for member in model]
    if len(set(sizes)) > 1:
        raise ValueError(f"the ensemble's models have target vocabularies of sizes {sizes}; "
                         "their probabilities can only be averaged over one vocabulary: use "
                         "models trained with the same target tokenizer")
    return list(model)
