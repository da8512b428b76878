"""The log-probability a model gives to target sequences that are already known (teacher
forcing, eval mode): what reranking another decoder's n-best list needs.

Tokens are scored as the decoders generate them: pad and bos are never generated (their
logits are -inf before the softmax, see `suppress_special`), so a hypothesis from
`beam_search(..., length_penalty=0)` scores here what the search scored it (up to float
rounding between the cached and the full decoder).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..nn import BOS_ID, PAD_ID, check_tokens
from ..parallel import RowSplit
from .common import (
    check_model,
    merge_for_decoding,
    prepare_source,
    split_model,
    suppress_special,
)


@functools.lru_cache(maxsize=64)
def _compiled_scorer(graphdef, split: RowSplit | None):
    def run(state, src, tgt):
        model = merge_for_decoding(graphdef, state)
        tgt_in = jnp.concatenate([jnp.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(suppress_special(model(src, tgt_in)), axis=-1)
        token_logp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(tgt != PAD_ID, token_logp, 0.0), axis=1)

    return jax.jit(run) if split is None else split.jit(run, row_args=(1, 2))


def sequence_log_probs(model, src_tokens, tgt_tokens, *, devices=None) -> np.ndarray:
    """log p(tgt | src) of each row under `model` (eval mode; the model is not changed).

    src_tokens: [B, S] int ids, 0 = padding; tgt_tokens: [B, L] the target without bos: its
    tokens, eos, then padding (a row without eos is scored over all L tokens). Returns float32
    [B]: the sum of the log-probabilities of the non-pad target tokens, eos included.
    devices: None (the default device), or a list of devices that each score their share of
    the rows (e.g. jax.local_devices(); see `flax_transformer.parallel.RowSplit`).
    """
    check_model(model)
    split = RowSplit.of(devices)
    src = prepare_source(model, src_tokens)
    tgt = np.asarray(tgt_tokens)
    check_tokens(tgt, model.config.tgt_vocab_size, model.config.max_len, "tgt_tokens")
    if tgt.shape[0] != src.shape[0]:
        raise ValueError(f"src_tokens and tgt_tokens batch sizes differ: {src.shape[0]} vs "
                         f"{tgt.shape[0]}; pass one target row per source row")
    graphdef, state = split_model(model)
    tgt, rows = tgt.astype(np.int32), src.shape[0]
    if split is not None:
        state, src, tgt = split.put(state, src, tgt)
    return np.asarray(_compiled_scorer(graphdef, split)(state, src, tgt))[:rows]
