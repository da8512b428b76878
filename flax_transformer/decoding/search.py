"""Greedy and sampled decoding: one token per step, the whole loop compiled.

The encoder runs once. With `use_cache=True` each step feeds only the newest token through
`Transformer.decode_step`, which appends its keys/values to fixed-size per-layer buffers;
with `use_cache=False` each step re-runs the decoder over the whole fixed-size prefix buffer
(the reference). Both loops are `lax.while_loop`s that stop once every row has produced eos.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..kernels import padding_mask
from ..nn import BOS_ID, EOS_ID, PAD_ID
from ..parallel import RowSplit
from .common import (
    NEG_INF,
    check_bool,
    check_max_len,
    check_model,
    check_positive_int,
    check_real,
    check_row_max_len,
    first_argmax,
    merge_for_decoding,
    prepare_source,
    split_model,
    suppress_special,
    trim,
)


def check_sampling(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """(temperature > 0, top_k >= 1 or None, top_p in (0, 1] or None), checked on the host;
    ValueError naming the argument otherwise."""
    temperature = check_real(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use greedy_decode (or top_k=1) for "
            "the temperature -> 0 limit"
        )
    tiny = float(np.finfo(np.float32).tiny)
    if temperature < tiny:  # float32 flushes it to zero, and dividing by it gives NaN
        raise ValueError(
            f"temperature {temperature} is below float32's smallest normal number ({tiny:.4g}); "
            "use greedy_decode (or top_k=1) for the temperature -> 0 limit"
        )
    if top_k is not None:
        top_k = check_positive_int(top_k, "top_k", "pass None to sample from the whole vocabulary")
    if top_p is not None:
        top_p = check_real(top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}; pass None for no nucleus")
    return temperature, top_k, top_p


def filter_logits(logits: jax.Array, *, temperature, top_k: int | None = None,
                  top_p=None) -> jax.Array:
    """(logits - their max) / temperature for logits [..., V] (the distribution of
    logits / temperature, finite for any temperature > 0), then keep only the `top_k` largest
    and the smallest set of largest whose probability mass reaches `top_p` (nucleus); the
    rest -> -inf. Ties at a cut-off are kept. The most likely token always survives. Concrete
    arguments are checked (`check_sampling`); traced `temperature`/`top_p` are the caller's.
    A `top_k` of V or more keeps every token."""
    if not any(isinstance(x, jax.core.Tracer) for x in (temperature, top_p)):
        temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    elif top_k is not None:
        top_k = check_positive_int(top_k, "top_k", "pass None to sample from the whole vocabulary")
    # Shifted so that the largest logit is 0: a tiny temperature then sends the others to
    # -inf instead of every logit to +-inf (the distribution is unchanged).
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    if top_p is not None:
        descending = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
        cutoff = jnp.take_along_axis(descending, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


@functools.lru_cache(maxsize=64)
def _compiled_search(graphdef, max_len: int, use_cache: bool, sampling: bool,
                     top_k: int | None, use_top_p: bool, return_logits: bool,
                     split: RowSplit | None):
    """The jitted decoding loop for one model structure and one set of static options."""

    def run(state, src, limits, rng, temperature, top_p, ignore_eos):
        model = merge_for_decoding(graphdef, state)
        memory, src_mask = model.encode(src), padding_mask(src)
        batch = src.shape[0]
        # tokens[:, 0] = bos is the first decoder input; step t writes its token at t + 1.
        tokens = jnp.zeros((batch, max_len + 1), jnp.int32).at[:, 0].set(BOS_ID)
        cache = model.init_cache(memory, src_mask, max_len) if use_cache else ()

        def next_logits(t, tokens, cache):
            if use_cache:
                current = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
                return model.decode_step(current, t, cache)
            # Reference: the full decoder over the whole prefix buffer (causal, so positions
            # after t do not matter), projected to the vocabulary at position t only.
            y = model.decoder(model.embed(tokens[:, :max_len], model.target_embedding),
                              memory, src_mask)
            return model.logits(jax.lax.dynamic_slice_in_dim(y, t, 1, axis=1))[:, 0], cache

        def body(carry):
            t, tokens, finished, cache, logits_buffer = carry
            logits, cache = next_logits(t, tokens, cache)
            scores = suppress_special(logits)
            if sampling:
                scores = filter_logits(scores, temperature=temperature, top_k=top_k,
                                       top_p=top_p if use_top_p else None)
                token = jax.random.categorical(jax.random.fold_in(rng, t), scores, axis=-1)
            else:
                token = first_argmax(scores)
            token = jnp.where(finished, PAD_ID, token).astype(jnp.int32)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t + 1))
            if return_logits:  # zeros once a row is done: they must not depend on its batch
                logits_buffer = jax.lax.dynamic_update_slice(
                    logits_buffer, jnp.where(finished[:, None], 0.0, logits)[:, None],
                    (0, t, 0))
            # A row ends at eos or at its own limit (as if decoded alone with max_len=limit).
            finished = finished | ((token == EOS_ID) & ~ignore_eos) | (t + 1 >= limits)
            return t + 1, tokens, finished, cache, logits_buffer

        def not_done(carry):
            t, _, finished, _, _ = carry
            return (t < max_len) & ~jnp.all(finished)

        vocab = model.config.tgt_vocab_size
        logits_buffer = jnp.zeros((batch, max_len, vocab), jnp.float32) if return_logits else None
        start = (jnp.int32(0), tokens, jnp.zeros((batch,), bool), cache, logits_buffer)
        _, tokens, _, _, logits_buffer = jax.lax.while_loop(not_done, body, start)
        return tokens[:, 1:], logits_buffer

    return jax.jit(run) if split is None else split.jit(run, row_args=(1, 2))


def _as_key(rng) -> jax.Array:
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array):
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ():
            return rng
        if rng.dtype == jnp.uint32 and rng.shape == (2,):
            return jax.random.wrap_key_data(rng)
    raise ValueError(
        f"rng must be a single jax.random.key(...) (or an int seed), got {rng!r}; "
        "use rng=jax.random.key(0)"
    )


def _run(model, src_tokens, *, max_len, use_cache, sampling, rng, temperature, top_k, top_p,
         ignore_eos, return_logits, devices=None, row_max_len=None):
    use_cache, ignore_eos, return_logits = (
        check_bool(use_cache, "use_cache"), check_bool(ignore_eos, "ignore_eos"),
        check_bool(return_logits, "return_logits"))
    split = RowSplit.of(devices)
    src = prepare_source(model, src_tokens)
    limits = check_row_max_len(row_max_len, src.shape[0], max_len)
    graphdef, state = split_model(model)
    rows = src.shape[0]
    if split is not None:
        state, src, limits = split.put(state, src, limits)
    fn = _compiled_search(graphdef, max_len, use_cache, sampling, top_k,
                          top_p is not None, return_logits, split)
    tokens, logits = fn(state, src, jnp.asarray(limits), rng, jnp.float32(temperature),
                        jnp.float32(1.0 if top_p is None else top_p), jnp.bool_(ignore_eos))
    tokens = trim(np.asarray(tokens)[:rows])
    if return_logits:
        return tokens, np.asarray(logits)[:rows, : tokens.shape[1]]
    return tokens


def greedy_decode(model, src_tokens, *, max_len: int, use_cache: bool = True,
                  ignore_eos: bool = False, return_logits: bool = False, devices=None,
                  row_max_len=None):
    """Greedy decoding: at each step the most probable next token (pad and bos excluded).

    model: a `Transformer` (its dropout mode is left untouched; decoding runs in eval mode);
    src_tokens: [B, S] int ids, 0 = padding (rows may have different lengths);
    max_len: tokens to generate at most, 1 <= max_len <= model.config.max_len;
    use_cache: incremental decoding with a key/value cache (False: re-run the decoder over
        the whole prefix each step, the slow reference);
    ignore_eos: keep generating after eos (for benchmarks: every row does max_len steps);
    return_logits: also return the raw step logits [B, L, V] (before pad/bos suppression;
        zeros after a row's eos, whose steps the batch's other rows may or may not run);
    devices: None (the default device), or a list of devices that each decode their share of
        the rows (e.g. jax.local_devices(); see `flax_transformer.parallel.RowSplit`);
    row_max_len: None, or [B] ints in [1, max_len]: row b generates at most row_max_len[b]
        tokens, its output that of decoding it alone with max_len=row_max_len[b] (a budget
        from each source's own length keeps a row's output independent of its batch).

    Returns tokens: np.ndarray int32 [B, L], L <= max_len: the generated tokens without the
    leading bos, up to and including eos, then 0 (pad); trailing columns that are padding in
    every row are trimmed, so L is the longest output in the batch.
    """
    check_model(model)
    max_len = check_max_len(model, max_len)
    return _run(model, src_tokens, max_len=max_len, use_cache=use_cache, sampling=False,
                rng=jax.random.key(0), temperature=1.0, top_k=None, top_p=None,
                ignore_eos=ignore_eos, return_logits=return_logits, devices=devices,
                row_max_len=row_max_len)


def sample_decode(model, src_tokens, *, rng, max_len: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                  ignore_eos: bool = False, return_logits: bool = False, row_max_len=None):
    """Ancestral sampling: each step draws the next token from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens and/or the nucleus of mass `top_p`
    (pad and bos are never drawn). Step t uses the key `fold_in(rng, t)`, so a fixed `rng`
    gives the same output. rng: a `jax.random.key` (or an int seed). top_k=1 is greedy.

    Returns the same as `greedy_decode` (which documents `row_max_len`).
    """
    check_model(model)
    max_len = check_max_len(model, max_len)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    return _run(model, src_tokens, max_len=max_len, use_cache=use_cache, sampling=True,
                rng=_as_key(rng), temperature=temperature, top_k=top_k, top_p=top_p,
                ignore_eos=ignore_eos, return_logits=return_logits, row_max_len=row_max_len)
