"""Multi-head attention as a Flax NNX module: projections around the functional kernel."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import TransformerConfig, check_config
from ..kernels import cache_layout, cached_attention, multi_head_attention, project


def dropout_stream(rngs: nnx.Rngs, rate: float, name: str) -> nnx.Rngs | None:
    """The `dropout` stream forked for one module, or None when `rate` is 0. ValueError when
    `rngs` has neither a `dropout` nor a `default` stream to draw from."""
    if rate <= 0:
        return None
    if "dropout" not in rngs and "default" not in rngs:
        raise ValueError(f"{name}={rate} needs a 'dropout' random stream; pass nnx.Rngs(seed) "
                         "or nnx.Rngs(params=..., dropout=...)")
    return rngs.dropout.fork()


def glorot(in_axis=0, out_axis=-1, batch_axis=()):
    """Glorot/Xavier uniform initialiser (fan-average), per projection matrix."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


class KVCache(NamedTuple):
    """Projected keys and values of one attention sub-layer, kept between decoding steps.

    key: [B*H, Dh, T], value: [B*H, T, Dh] (see `kernels.cached_attention`). For
    self-attention T is the decoding buffer length (filled up to the current position); for
    encoder-decoder attention T is the source length.
    A NamedTuple, hence a pytree: it passes through `jax.jit` and `lax.while_loop` as is.
    """

    key: jax.Array
    value: jax.Array


class MultiHeadAttention(nnx.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Parameters: `query_kernel` [D, D] (all heads' W^Q side by side), `key_value_kernel`
    [D, 2, D] (W^K and W^V), `output_kernel` [D, D] (W^O), and biases. In self-attention the
    three input projections run as one fused matmul.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        check_config(config)
        d, pdt = config.d_model, jnp.dtype(config.param_dtype)
        self.num_heads = config.num_heads
        self.dtype = jnp.dtype(config.dtype)
        self.implementation = config.attention_impl
        self.block_size = config.attention_block_size
        self.dropout_rate = config.attention_dropout_rate
        self.deterministic = False  # flipped by model.eval() / model.train()
        self.query_kernel = nnx.Param(glorot()(rngs.params(), (d, d), pdt))
        self.query_bias = nnx.Param(jnp.zeros((d,), pdt))
        self.key_value_kernel = nnx.Param(glorot(batch_axis=(1,))(rngs.params(), (d, 2, d), pdt))
        self.key_value_bias = nnx.Param(jnp.zeros((2, d), pdt))
        self.output_kernel = nnx.Param(glorot()(rngs.params(), (d, d), pdt))
        self.output_bias = nnx.Param(jnp.zeros((d,), pdt))
        self.dropout_rngs = dropout_stream(rngs, self.dropout_rate, "attention_dropout_rate")

    def _split_heads(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, T, D] -> [B, T, H, D/H]"""
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def query(self, x: jnp.ndarray) -> jnp.ndarray:
        """Q W^Q for all heads: x [B, Tq, D] -> [B, Tq, H, Dh]"""
        q = project(x.astype(self.dtype), self.query_kernel[...].astype(self.dtype),
                    self.query_bias[...])
        return self._split_heads(q)

    def key_value(self, context: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """K W^K and V W^V for all heads: context [B, Tk, D] -> two [B, Tk, H, Dh]"""
        kv = project(context.astype(self.dtype), self.key_value_kernel[...].astype(self.dtype),
                     self.key_value_bias[...])
        k, v = jnp.split(kv, 2, axis=2)  # backward: one concatenate (see query_key_value)
        return self._split_heads(k[:, :, 0]), self._split_heads(v[:, :, 0])

    def query_key_value(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        """Fused self-attention projections: x [B, T, D] -> q, k, v each [B, T, H, Dh]"""
        w = jnp.concatenate([self.query_kernel[...][:, None], self.key_value_kernel[...]], axis=1)
        b = jnp.concatenate([self.query_bias[...][None], self.key_value_bias[...]], axis=0)
        qkv = project(x.astype(self.dtype), w.astype(self.dtype), b)
        # split, not three slices: the gradient is then one concatenate, where the slices'
        # pads and adds made XLA:CPU's slowest fusion of a bf16 step (RESULTS.md)
        return tuple(self._split_heads(t[:, :, 0]) for t in jnp.split(qkv, 3, axis=2))

    def attend(self, q, k, v, mask=None, *, causal: bool = False) -> jnp.ndarray:
        """Attention in every head, heads concatenated, then W^O: -> [B, Tq, D]"""
        use_dropout = self.dropout_rate > 0 and not self.deterministic
        heads = multi_head_attention(
            q, k, v, mask,
            causal=causal,
            implementation=self.implementation,
            dropout_rate=self.dropout_rate if use_dropout else 0.0,
            dropout_rng=self.dropout_rngs() if use_dropout else None,
            block_size=self.block_size,
        )
        return self._output(heads)

    def _output(self, heads: jnp.ndarray) -> jnp.ndarray:
        """Concat(head_1, ..., head_H) W^O: heads [B, T, H, Dh] -> [B, T, D]"""
        concat = heads.reshape(*heads.shape[:2], -1)
        return project(concat, self.output_kernel[...].astype(self.dtype), self.output_bias[...])

    def __call__(
        self,
        x: jnp.ndarray,
        context: jnp.ndarray | None = None,
        mask: jnp.ndarray | None = None,
        *,
        causal: bool = False,
    ) -> jnp.ndarray:
        """x: [B, Tq, D] queries; context: [B, Tk, D] source of keys and values (None:
        self-attention on x); mask: bool [B|1, H|1, Tq|1, Tk|1]  ->  [B, Tq, D]"""
        d_model = self.query_kernel.shape[0]
        for name, array in (("x", x), ("context", context)):
            if array is not None and (array.ndim != 3 or array.shape[-1] != d_model):
                raise ValueError(f"{name} must be [batch, length, d_model={d_model}], got shape "
                                 f"{array.shape}")
        if context is None:
            q, k, v = self.query_key_value(x)
        else:
            q = self.query(x)
            k, v = self.key_value(context)
        return self.attend(q, k, v, mask, causal=causal)

    # --- incremental decoding (one query position at a time) -------------------------------

    def set_view(self, deterministic: bool | None = None):
        """`nnx.view(model, deterministic=True)` turns attention dropout off in the view."""
        if deterministic is not None:
            self.deterministic = deterministic

    def init_self_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty self-attention cache: keys [B*H, Dh, max_len], values [B*H, max_len, Dh]."""
        head_dim = self.query_kernel.shape[-1] // self.num_heads
        rows = batch * self.num_heads
        return KVCache(jnp.zeros((rows, head_dim, max_len), self.dtype),
                       jnp.zeros((rows, max_len, head_dim), self.dtype))

    def cross_cache(self, memory: jnp.ndarray) -> KVCache:
        """Keys and values of the encoder memory [B, S, D], projected once per input."""
        return KVCache(*cache_layout(*self.key_value(memory)))

    def self_attend_step(self, x: jnp.ndarray, position, cache: KVCache
                         ) -> tuple[jnp.ndarray, KVCache]:
        """Masked self-attention for the single new position `position` (a traced int).

        x: [B, 1, D]; cache: KVCache of length L holding the positions < position.
        Writes this position's key and value into the cache at `position`, attends to the keys
        at positions <= position (the causal mask, one row of it)  ->  ([B, 1, D], new cache).
        """
        # Separate projections: the fused one concatenates the weights, a copy every step.
        q, (k, v) = self.query(x), self.key_value(x)
        k, v = cache_layout(k.astype(cache.key.dtype), v.astype(cache.value.dtype))
        key = jax.lax.dynamic_update_slice(cache.key, k, (0, 0, position))
        value = jax.lax.dynamic_update_slice(cache.value, v, (0, position, 0))
        seen = jnp.arange(value.shape[1]) <= position
        return self.attend_cache(q, key, value, seen[None, None, None, :]), KVCache(key, value)

    def cross_attend_step(self, x: jnp.ndarray, cache: KVCache,
                          mask: jnp.ndarray | None) -> jnp.ndarray:
        """Encoder-decoder attention of x [B*K, 1, D] over the memory keys/values of B inputs
        (cache rows B*H; mask [B, 1, 1, S] or None)  ->  [B*K, 1, D].

        K >= 1 decoder rows share each input (beam search: row b*K + j is beam j of input b).
        Their K queries attend together as K query positions of input b, so the memory is
        projected, stored and read once per input, not once per beam.
        """
        rows, inputs = x.shape[0], cache.key.shape[0] // self.num_heads
        if rows % inputs:
            raise ValueError(f"{rows} decoder rows do not divide among the {inputs} inputs of "
                             "the memory cache; pass K rows per input (beams of input b at "
                             "rows b*K .. b*K+K-1)")
        q = self.query(x)  # [B*K, 1, H, Dh] -> [B, K, H, Dh]: the beams as query positions
        q = q.reshape(inputs, rows // inputs, *q.shape[2:])
        heads = cached_attention(q, cache.key, cache.value, mask)
        return self._output(heads.reshape(rows, 1, *heads.shape[2:]))

    def attend_cache(self, q, key, value, mask) -> jnp.ndarray:
        """`attend` for q [B, 1, H, Dh] over cached keys/values (KVCache layouts) -> [B, 1, D]"""
        heads = cached_attention(q, key, value, mask)
        return self._output(heads)
