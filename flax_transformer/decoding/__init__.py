"""Inference: greedy, sampled and beam-search decoding with a key/value cache.

    from flax_transformer.decoding import greedy_decode, sample_decode, beam_search
    from flax_transformer.decoding import sequence_log_probs   # score given targets

The encoder runs once per input; the decoder runs one token per step on explicit cache state
(`Transformer.init_cache` / `Transformer.decode_step`), inside one `jax.jit`-compiled
`lax.while_loop` per (model structure, shapes, options) that exits early once every row is
finished. Outputs are NumPy int32 [B, L]: generated tokens without bos, eos included, pad (0)
after it, trimmed to the longest row (L <= max_len). Pad and bos are never generated.
`beam_search` also decodes an ensemble: pass a list of models sharing a target vocabulary.
"""

from .beam import beam_search, ensemble_members, gnmt_length_penalty
from .score import sequence_log_probs
from .search import filter_logits, greedy_decode, sample_decode

__all__ = ["beam_search", "ensemble_members", "filter_logits", "gnmt_length_penalty",
           "greedy_decode", "sample_decode", "sequence_log_probs"]
