"""Peer for `bench_train`: the same Transformer built from Flax's own NNX layers.

`nnx.MultiHeadAttention`, `nnx.Linear`, `nnx.LayerNorm`, `nnx.Embed`, `nnx.Dropout`, masks from
`nnx.make_attention_mask` / `nnx.make_causal_mask`: what a Flax user writes following Flax's
examples, with the paper's post-norm layers, sinusoidal positions and a tied output projection.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from flax_transformer import TransformerConfig
from flax_transformer.kernels import sinusoidal_positions


def _dtype(c: TransformerConfig):
    return jnp.dtype(c.dtype)


class FlaxMLP(nnx.Module):
    def __init__(self, c: TransformerConfig, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(c.d_model, c.d_ff, dtype=_dtype(c), rngs=rngs)
        self.linear2 = nnx.Linear(c.d_ff, c.d_model, dtype=_dtype(c), rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


def _attention(c: TransformerConfig, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(c.num_heads, c.d_model, decode=False, dropout_rate=0.0,
                                  deterministic=True, dtype=_dtype(c), rngs=rngs)


def _norm(c: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=_dtype(c), rngs=rngs)


class FlaxEncoderLayer(nnx.Module):
    def __init__(self, c: TransformerConfig, rngs: nnx.Rngs):
        self.attn, self.mlp = _attention(c, rngs), FlaxMLP(c, rngs)
        self.norm1, self.norm2 = _norm(c, rngs), _norm(c, rngs)
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs)

    def __call__(self, x, mask):
        x = self.norm1(x + self.dropout(self.attn(x, mask=mask)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class FlaxDecoderLayer(nnx.Module):
    def __init__(self, c: TransformerConfig, rngs: nnx.Rngs):
        self.self_attn, self.cross_attn = _attention(c, rngs), _attention(c, rngs)
        self.mlp = FlaxMLP(c, rngs)
        self.norms = nnx.List([_norm(c, rngs) for _ in range(3)])
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs)

    def __call__(self, y, memory, self_mask, cross_mask):
        y = self.norms[0](y + self.dropout(self.self_attn(y, mask=self_mask)))
        y = self.norms[1](y + self.dropout(self.cross_attn(y, memory, mask=cross_mask)))
        return self.norms[2](y + self.dropout(self.mlp(y)))


class FlaxPeerTransformer(nnx.Module):
    """`model(src[B, S], tgt[B, T]) -> logits[B, T, V]`, architecture of `Transformer`."""

    def __init__(self, c: TransformerConfig, *, rngs: nnx.Rngs):
        self.d_model = c.d_model
        init = nnx.initializers.normal(stddev=c.d_model**-0.5)
        self.src_embed = nnx.Embed(c.src_vocab_size, c.d_model, embedding_init=init,
                                  dtype=_dtype(c), rngs=rngs)
        self.tgt_embed = nnx.Embed(c.tgt_vocab_size, c.d_model, embedding_init=init,
                                  dtype=_dtype(c), rngs=rngs)
        self.encoder = nnx.List([FlaxEncoderLayer(c, rngs) for _ in range(c.num_encoder_layers)])
        self.decoder = nnx.List([FlaxDecoderLayer(c, rngs) for _ in range(c.num_decoder_layers)])
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs)
        self.positions = nnx.Variable(jnp.asarray(sinusoidal_positions(c.max_len, c.d_model)))

    def embed(self, tokens, table):
        x = table(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.shape[1]]
        return self.dropout(x)

    def __call__(self, src, tgt):
        src_mask = nnx.make_attention_mask(src > 0, src > 0)
        x = self.embed(src, self.src_embed)
        for layer in self.encoder:
            x = layer(x, src_mask)
        self_mask = nnx.combine_masks(nnx.make_attention_mask(tgt > 0, tgt > 0),
                                      nnx.make_causal_mask(tgt))
        cross_mask = nnx.make_attention_mask(tgt > 0, src > 0)
        y = self.embed(tgt, self.tgt_embed)
        for layer in self.decoder:
            y = layer(y, x, self_mask, cross_mask)
        return self.tgt_embed.attend(y).astype(jnp.float32)
