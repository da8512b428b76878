"""The encoder-decoder Transformer: embeddings, positions, encoder, decoder, output logits."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import TransformerConfig, check_config
from ..kernels import padding_mask, project, sinusoidal_positions, unembed
from ..kernels.masks import check_mask
from .layers import Decoder, DecoderLayerCache, Dropout, Encoder

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@functools.lru_cache(maxsize=32)
def _positions(length: int, d_model: int) -> np.ndarray:
    return sinusoidal_positions(length, d_model)


def check_tokens(tokens, vocab_size: int, max_len: int, name: str) -> None:
    """Host-side check of a token batch `[B, T]`: shape, length, and (when the values are
    concrete, i.e. outside jit) the id range. Raises ValueError naming `name` and the fix."""
    shape = getattr(tokens, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be a [batch, length] array of token ids, got shape {shape}")
    if shape[1] > max_len:
        raise ValueError(
            f"{name} has length {shape[1]} > max_len={max_len}; truncate the input or build "
            f"the model with a larger TransformerConfig.max_len"
        )
    if shape[1] < 1 or shape[0] < 1:
        raise ValueError(f"{name} is empty (shape {shape})")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer | jax.ShapeDtypeStruct):
        return  # values unknown under jit; the caller checks them on the host
    values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(
            f"{name} holds token ids in [{values.min()}, {values.max()}] but the vocabulary "
            f"size is {vocab_size}; ids must be in [0, {vocab_size}) (check the tokenizer or "
            f"the config's vocab size)"
        )


class DecodeCache(NamedTuple):
    """Everything a decoding step needs besides the new token (a pytree).

    layers: one `DecoderLayerCache` per decoder layer; src_mask: [B, 1, 1, S] source padding.
    """

    layers: tuple[DecoderLayerCache, ...]
    src_mask: jax.Array


class Transformer(nnx.Module):
    """Encoder-decoder Transformer ("Attention Is All You Need").

    `model(src[B, S], tgt[B, T]) -> logits[B, T, V]` (float32), where `tgt` is the decoder
    input (bos + target shifted right). Token id 0 is padding.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.config = config
        d, pdt = config.d_model, jnp.dtype(config.param_dtype)
        self.dtype = jnp.dtype(config.dtype)
        init = nnx.initializers.normal(stddev=d**-0.5)  # unit variance after * sqrt(d_model)
        embed = lambda n: nnx.Embed(n, d, dtype=self.dtype, param_dtype=pdt,  # noqa: E731
                                    embedding_init=init, rngs=rngs)
        self.src_embed = embed(config.src_vocab_size)
        self.tgt_embed = None if config.share_embeddings else embed(config.tgt_vocab_size)
        self.embed_dropout = Dropout(config.dropout_rate, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if config.tie_output:
            self.output = None
        else:
            self.output = nnx.Linear(d, config.tgt_vocab_size, dtype=self.dtype,
                                     param_dtype=pdt, rngs=rngs)

    @property
    def target_embedding(self) -> nnx.Embed:
        """The target-side embedding table (the source one when `share_embeddings`)."""
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    def embed(self, tokens: jnp.ndarray, table: nnx.Embed, offset: int = 0) -> jnp.ndarray:
        """Embedding * sqrt(d_model) + PE[offset : offset + T], then dropout: -> [B, T, D]

        `offset` may also be a traced integer (a decoding loop's position); then the slice is
        taken from the table of `config.max_len` positions with `lax.dynamic_slice`.
        """
        length, d = tokens.shape[1], self.config.d_model
        if isinstance(offset, int | np.integer):
            pe = _positions(offset + length, d)[offset:]
        else:
            all_positions = jnp.asarray(_positions(self.config.max_len, d))
            pe = jax.lax.dynamic_slice_in_dim(all_positions, offset, length, axis=0)
        # Rows first, then the compute dtype: `nnx.Embed.__call__` casts the whole [V, D] table
        # (and its gradient back), and accumulates the gradient of repeated ids in that dtype.
        # Ids outside [0, V) give NaN rows, negative ones too (take would wrap them).
        tokens = jnp.where(tokens < 0, table.embedding.shape[0], tokens)
        rows = jnp.take(table.embedding[...], tokens, axis=0).astype(self.dtype)
        x = rows * jnp.asarray(math.sqrt(d), self.dtype) + pe.astype(self.dtype)
        return self.embed_dropout(x)

    def logits(self, y: jnp.ndarray) -> jnp.ndarray:
        """Pre-softmax projection of decoder states [B, T, D] -> [B, T, V] in float32."""
        y = y.astype(self.dtype)
        if self.output is None:  # tied: y E^T with the target embedding E [V, D]
            out = unembed(y, self.target_embedding.embedding[...].astype(self.dtype))
        else:
            out = project(y, self.output.kernel[...].astype(self.dtype), self.output.bias[...])
        return out.astype(jnp.float32)

    def encode(self, src: jnp.ndarray) -> jnp.ndarray:
        """src: [B, S] token ids  ->  memory [B, S, D]"""
        check_tokens(src, self.config.src_vocab_size, self.config.max_len, "src_tokens")
        return self.encoder(self.embed(src, self.src_embed), padding_mask(src))

    def decode(self, tgt: jnp.ndarray, memory: jnp.ndarray,
               src_mask: jnp.ndarray | None) -> jnp.ndarray:
        """tgt: [B, T] decoder input ids; memory: [B, S, D]; src_mask: [B, 1, 1, S] -> [B, T, V]"""
        check_tokens(tgt, self.config.tgt_vocab_size, self.config.max_len, "tgt_tokens")
        if (memory.ndim != 3 or memory.shape[0] != tgt.shape[0]
                or memory.shape[2] != self.config.d_model):
            raise ValueError(
                f"memory must be [batch, src_len, d_model={self.config.d_model}] with the batch "
                f"of tgt_tokens {tgt.shape}, got {memory.shape}; pass this model's encode(src)"
            )
        y = self.decoder(self.embed(tgt, self.target_embedding), memory, src_mask)
        return self.logits(y)

    def __call__(self, src: jnp.ndarray, tgt: jnp.ndarray) -> jnp.ndarray:
        """src: [B, S], tgt: [B, T] token ids  ->  logits [B, T, tgt_vocab_size] (float32)"""
        check_tokens(src, self.config.src_vocab_size, self.config.max_len, "src_tokens")
        check_tokens(tgt, self.config.tgt_vocab_size, self.config.max_len, "tgt_tokens")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"src_tokens and tgt_tokens batch sizes differ: {src.shape[0]} vs {tgt.shape[0]}; "
                "pass one target row per source row"
            )
        return self.decode(tgt, self.encode(src), padding_mask(src))

    # --- incremental decoding ------------------------------------------------------------

    def init_cache(self, memory: jnp.ndarray, src_mask: jnp.ndarray | None,
                   max_len: int, beams: int = 1) -> DecodeCache:
        """The decoding state for `max_len` target positions: empty self-attention buffers
        for B*beams decoder rows per layer and the memory's keys/values projected once.

        memory: [B, S, D] from `encode`; src_mask: [B, 1, 1, S] (None: no source padding);
        beams: decoder rows per input (beam search: rows b*beams .. b*beams+beams-1 decode
        input b). The memory is not repeated per beam: an input's beams read one copy.
        """
        if (not isinstance(max_len, int | np.integer) or isinstance(max_len, bool)
                or not 1 <= max_len <= self.config.max_len):
            raise ValueError(
                f"max_len must be an integer in [1, TransformerConfig.max_len="
                f"{self.config.max_len}], got {max_len!r}; decode fewer tokens or build the "
                "model with a larger max_len"
            )
        if not isinstance(beams, int | np.integer) or isinstance(beams, bool) or beams < 1:
            raise ValueError(f"beams must be an integer >= 1 (decoder rows per input), got "
                             f"{beams!r}; pass beams=1 unless decoding several beams per input")
        if memory.ndim != 3 or memory.shape[2] != self.config.d_model:
            raise ValueError(f"memory must be [batch, src_len, d_model={self.config.d_model}], "
                             f"got {memory.shape}; pass this model's encode(src)")
        if src_mask is None:
            src_mask = jnp.ones((memory.shape[0], 1, 1, memory.shape[1]), bool)
        if src_mask.shape[0] != memory.shape[0]:
            raise ValueError(f"src_mask has batch {src_mask.shape[0]} but memory has "
                             f"{memory.shape[0]}; pass padding_mask(src) of the encoded src")
        check_mask(src_mask, (memory.shape[0], 1, 1, memory.shape[1]))
        return DecodeCache(self.decoder.init_cache(memory, int(max_len), int(beams)), src_mask)

    def decode_step(self, token: jnp.ndarray, position,
                    cache: DecodeCache) -> tuple[jnp.ndarray, DecodeCache]:
        """One decoder step: token [B, 1] is the decoder input at `position` (an int or a traced
        int; bos at 0)  ->  (logits [B, V] float32 for the next token, updated cache).
        A concrete position must lie within the cache (a traced one is not checked: past the
        end, the buffer update would clamp it and overwrite the last slot).

        Equals `decode(tgt, ...)[:, position]` when the cache holds tgt[:, :position].
        """
        if token.ndim != 2 or token.shape[1] != 1:
            raise ValueError(f"token must be [batch, 1], got shape {token.shape}")
        check_tokens(token, self.config.tgt_vocab_size, self.config.max_len, "token")
        self_cache = cache.layers[0].self_attention.value  # [B*K*H, max_len, Dh]
        rows, slots = self_cache.shape[0] // self.config.num_heads, self_cache.shape[1]
        if token.shape[0] != rows:
            raise ValueError(f"token has batch {token.shape[0]} but the cache was built for "
                             f"{rows} rows; pass one token per cached row")
        integer = isinstance(position, int | np.integer) or (
            hasattr(position, "dtype") and jnp.issubdtype(position.dtype, jnp.integer))
        if isinstance(position, bool) or not integer:
            raise ValueError(f"position must be an integer (the target position), got "
                             f"{position!r}")
        if jnp.ndim(position) != 0:
            raise ValueError(f"position must be a scalar, got shape {jnp.shape(position)}")
        if not isinstance(position, jax.core.Tracer):
            position = int(position)  # concrete (a Python int or an array): checked here
        if isinstance(position, int) and not 0 <= position < slots:
            raise ValueError(f"position {position} is outside the cache's {slots} target "
                             f"positions (0 to {slots - 1}); build the cache with "
                             "init_cache(..., max_len) large enough")
        y = self.embed(token, self.target_embedding, offset=position)
        y, layers = self.decoder.decode_step(y, position, cache.layers, cache.src_mask)
        return self.logits(y)[:, 0], cache._replace(layers=layers)
