"""Feed-forward, Add&Norm, encoder and decoder layers, and the N-layer stacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import TransformerConfig, check_config
from ..kernels import dropout, feed_forward, layer_norm
from .attention import KVCache, MultiHeadAttention, dropout_stream, glorot


class FeedForward(nnx.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, applied to each position: [B, T, D] -> [B, T, D]"""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        d, f, pdt = config.d_model, config.d_ff, jnp.dtype(config.param_dtype)
        self.activation = config.activation
        self.dtype = jnp.dtype(config.dtype)
        self.w1 = nnx.Param(glorot()(rngs.params(), (d, f), pdt))
        self.b1 = nnx.Param(jnp.zeros((f,), pdt))
        self.w2 = nnx.Param(glorot()(rngs.params(), (f, d), pdt))
        self.b2 = nnx.Param(jnp.zeros((d,), pdt))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., D] -> [..., D]: act(x W1 + b1) W2 + b2 in the compute dtype."""
        # biases stay in their dtype: `project` adds them before its one rounding
        cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
        return feed_forward(x.astype(self.dtype), cast(self.w1), self.b1[...], cast(self.w2),
                            self.b2[...], activation=self.activation)


class Dropout(nnx.Module):
    """Residual/embedding dropout (kernel `dropout`); off after `model.eval()` or under
    `nnx.view(model, deterministic=True)`. Draws from the `dropout` stream of the Rngs."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = False
        self.rngs = dropout_stream(rngs, rate, "dropout_rate")

    def set_view(self, deterministic: bool | None = None):
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.rate == 0.0 or self.deterministic:
            return x
        return dropout(x, self.rate, self.rngs())


class AddNorm(nnx.Module):
    """The residual connection around a sub-layer, with dropout and LayerNorm.

    "post" (the paper): LayerNorm(x + Dropout(Sublayer(x)));
    "pre":              x + Dropout(Sublayer(LayerNorm(x))).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.pre_norm = config.norm == "pre"
        self.norm = LayerNorm(config, rngs=rngs)
        self.dropout = Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x: jnp.ndarray, sublayer: Callable[[jnp.ndarray], jnp.ndarray]):
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class LayerNorm(nnx.Module):
    """LayerNorm over d_model (kernel `layer_norm`): float32 statistics, compute-dtype output."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs | None = None):
        pdt = jnp.dtype(config.param_dtype)
        self.epsilon = config.layer_norm_epsilon
        self.dtype = jnp.dtype(config.dtype)
        self.scale = nnx.Param(jnp.ones((config.d_model,), pdt))
        self.bias = nnx.Param(jnp.zeros((config.d_model,), pdt))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = layer_norm(x, self.scale[...], self.bias[...], epsilon=self.epsilon)
        return y.astype(self.dtype)


class EncoderLayer(nnx.Module):
    """Multi-head self-attention, then the feed-forward network, each followed by Add&Norm."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.self_attention = MultiHeadAttention(config, rngs=rngs)
        self.add_norm_1 = AddNorm(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        self.add_norm_2 = AddNorm(config, rngs=rngs)

    def __call__(self, x: jnp.ndarray, src_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: [B, S, D]; src_mask: [B, 1, 1, S] (True = real token; None: every position)
        ->  [B, S, D]"""
        x = self.add_norm_1(x, lambda h: self.self_attention(h, mask=src_mask))
        return self.add_norm_2(x, self.feed_forward)


class DecoderLayerCache(NamedTuple):
    """What one decoder layer keeps between decoding steps (a pytree).

    self_attention: keys/values of the target positions so far, one row per decoder row
    (B*K: K beams per input), buffers of max_len positions (layouts: see KVCache);
    cross_attention: keys/values of the encoder memory, one row per input (B), computed once.
    """

    self_attention: KVCache
    cross_attention: KVCache


class DecoderLayer(nnx.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward; each then Add&Norm."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.self_attention = MultiHeadAttention(config, rngs=rngs)
        self.add_norm_1 = AddNorm(config, rngs=rngs)
        self.cross_attention = MultiHeadAttention(config, rngs=rngs)
        self.add_norm_2 = AddNorm(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        self.add_norm_3 = AddNorm(config, rngs=rngs)

    def __call__(self, y: jnp.ndarray, memory: jnp.ndarray,
                 src_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """y: [B, T, D] target states; memory: [B, S, D] encoder output;
        src_mask: [B, 1, 1, S] (None: no padding)  ->  [B, T, D]. Position t sees targets
        <= t only."""
        y = self.add_norm_1(y, lambda h: self.self_attention(h, causal=True))
        y = self.add_norm_2(y, lambda h: self.cross_attention(h, memory, src_mask))
        return self.add_norm_3(y, self.feed_forward)

    def init_cache(self, memory: jnp.ndarray, max_len: int, beams: int = 1) -> DecoderLayerCache:
        """Empty self-attention buffers of `max_len` positions for `beams` decoder rows per
        input (B*beams rows); memory [B, S, D] projected once, shared by an input's beams."""
        return DecoderLayerCache(
            self.self_attention.init_self_cache(memory.shape[0] * beams, max_len),
            self.cross_attention.cross_cache(memory),
        )

    def decode_step(self, y: jnp.ndarray, position, cache: DecoderLayerCache,
                    src_mask: jnp.ndarray | None) -> tuple[jnp.ndarray, DecoderLayerCache]:
        """The layer at one new target position: y [B, 1, D] (the state at `position`);
        same sub-layers and Add&Norm as `__call__`  ->  ([B, 1, D], updated cache)."""
        updated = {}

        def masked_self_attention(h):
            out, updated["self"] = self.self_attention.self_attend_step(
                h, position, cache.self_attention)
            return out

        y = self.add_norm_1(y, masked_self_attention)
        y = self.add_norm_2(y, lambda h: self.cross_attention.cross_attend_step(
            h, cache.cross_attention, src_mask))
        y = self.add_norm_3(y, self.feed_forward)
        return y, cache._replace(self_attention=updated["self"])


def _run_layers(layers, x, *args, remat: bool, scan: bool):
    """Apply `layers` in order; with `remat`, recompute each layer in the backward pass; with
    `scan`, as one `lax.scan` over the layers (`_scan_layers`)."""
    if scan and len(layers) > 1:
        return _scan_layers(layers, x, *args, remat=remat)
    for layer in layers:
        if remat:
            x = nnx.remat(lambda mdl, h, *a: mdl(h, *a))(layer, x, *args)
        else:
            x = layer(x, *args)
    return x


def _scan_layers(layers, x, *args, remat: bool):
    """The identical `layers` as one `lax.scan` whose body is one layer: XLA compiles one layer
    instead of N. Their variables are stacked on every call ([N, ...]; the parameters stay
    stored per layer, so checkpoints do not change); when dropout is on, the advanced dropout
    streams are written back after the scan. The same function as the loop."""
    graphdef = nnx.graphdef(layers[0])
    states = [nnx.split(layer, nnx.Param, ...)[1:] for layer in layers]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def one_layer(h, state):
        layer = nnx.merge(graphdef, *state)
        return layer(h, *args), nnx.state(layer, nnx.Not(nnx.Param))

    if remat:
        one_layer = jax.checkpoint(one_layer, prevent_cse=False)
    x, others = jax.lax.scan(one_layer, x, stacked)
    if _draws_random(layers[0]):  # else nothing changed (and a decoding loop may not write)
        for i, layer in enumerate(layers):
            nnx.update(layer, jax.tree.map(lambda leaf, i=i: leaf[i], others))
    return x


def _draws_random(layer) -> bool:
    """Whether calling `layer` advances a dropout stream: some dropout in it is on."""
    for _, module in nnx.iter_modules(layer):
        rate = getattr(module, "rate", getattr(module, "dropout_rate", 0.0))
        if rate > 0 and getattr(module, "deterministic", True) is False:
            return True
    return False


class Encoder(nnx.Module):
    """N identical encoder layers (plus a final LayerNorm with pre-norm)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.remat, self.scan = config.remat, config.scan_layers
        self.layers = nnx.List(
            [EncoderLayer(config, rngs=rngs) for _ in range(config.num_encoder_layers)]
        )
        self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None

    def __call__(self, x: jnp.ndarray, src_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: [B, S, D] embedded source; src_mask: [B, 1, 1, S] (None: no padding)
        ->  memory [B, S, D]"""
        x = _run_layers(self.layers, x, src_mask, remat=self.remat, scan=self.scan)
        return x if self.final_norm is None else self.final_norm(x)

    def set_view(self, remat: bool | None = None):
        """`nnx.view(model, remat=False)`: plain layer calls (decoding never differentiates,
        and `nnx.remat` cannot run inside a decoding loop over a model merged outside it)."""
        if remat is not None:
            self.remat = remat


class Decoder(nnx.Module):
    """N identical decoder layers (plus a final LayerNorm with pre-norm)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.remat, self.scan = config.remat, config.scan_layers
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs) for _ in range(config.num_decoder_layers)]
        )
        self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None

    def __call__(self, y: jnp.ndarray, memory: jnp.ndarray,
                 src_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """y: [B, T, D] embedded targets; memory: [B, S, D]; src_mask: [B, 1, 1, S] (None: no
        padding) -> [B, T, D]"""
        y = _run_layers(self.layers, y, memory, src_mask, remat=self.remat, scan=self.scan)
        return y if self.final_norm is None else self.final_norm(y)

    def set_view(self, remat: bool | None = None):
        """`nnx.view(model, remat=False)`: plain layer calls (decoding never differentiates,
        and `nnx.remat` cannot run inside a decoding loop over a model merged outside it)."""
        if remat is not None:
            self.remat = remat

    def init_cache(self, memory: jnp.ndarray, max_len: int,
                   beams: int = 1) -> tuple[DecoderLayerCache, ...]:
        """One `DecoderLayerCache` per layer (see `DecoderLayer.init_cache`)."""
        return tuple(layer.init_cache(memory, max_len, beams) for layer in self.layers)

    def decode_step(self, y: jnp.ndarray, position, caches: tuple[DecoderLayerCache, ...],
                    src_mask: jnp.ndarray | None):
        """y: [B, 1, D] embedded target at `position`  ->  ([B, 1, D], updated caches)"""
        updated = []
        for layer, cache in zip(self.layers, caches, strict=True):
            y, cache = layer.decode_step(y, position, cache, src_mask)
            updated.append(cache)
        y = y if self.final_norm is None else self.final_norm(y)
        return y, tuple(updated)
