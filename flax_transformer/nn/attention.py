"""Multi-head attention as a Flax NNX module: projections around the functional kernel."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ..config import TransformerConfig
from ..kernels import multi_head_attention


def glorot(in_axis=0, out_axis=-1, batch_axis=()):
    """Glorot/Xavier uniform initialiser (fan-average), per projection matrix."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


class MultiHeadAttention(nnx.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Parameters: `query_kernel` [D, D] (all heads' W^Q side by side), `key_value_kernel`
    [D, 2, D] (W^K and W^V), `output_kernel` [D, D] (W^O), and biases. In self-attention the
    three input projections run as one fused matmul.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
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
        self.dropout_rngs = rngs.dropout.fork() if self.dropout_rate > 0 else None

    def _split_heads(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, T, D] -> [B, T, H, D/H]"""
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def query(self, x: jnp.ndarray) -> jnp.ndarray:
        """Q W^Q for all heads: x [B, Tq, D] -> [B, Tq, H, Dh]"""
        q = x.astype(self.dtype) @ self.query_kernel[...].astype(self.dtype)
        return self._split_heads(q + self.query_bias[...].astype(self.dtype))

    def key_value(self, context: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """K W^K and V W^V for all heads: context [B, Tk, D] -> two [B, Tk, H, Dh]"""
        kv = jnp.einsum("btd,dse->btse", context.astype(self.dtype),
                        self.key_value_kernel[...].astype(self.dtype))
        kv = kv + self.key_value_bias[...].astype(self.dtype)
        return self._split_heads(kv[:, :, 0]), self._split_heads(kv[:, :, 1])

    def query_key_value(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        """Fused self-attention projections: x [B, T, D] -> q, k, v each [B, T, H, Dh]"""
        w = jnp.concatenate([self.query_kernel[...][:, None], self.key_value_kernel[...]], axis=1)
        b = jnp.concatenate([self.query_bias[...][None], self.key_value_bias[...]], axis=0)
        qkv = jnp.einsum("btd,dse->btse", x.astype(self.dtype), w.astype(self.dtype))
        qkv = qkv + b.astype(self.dtype)
        return tuple(self._split_heads(qkv[:, :, i]) for i in range(3))

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
        concat = heads.reshape(*heads.shape[:2], -1)
        out = concat @ self.output_kernel[...].astype(self.dtype)
        return out + self.output_bias[...].astype(self.dtype)

    def __call__(
        self,
        x: jnp.ndarray,
        context: jnp.ndarray | None = None,
        mask: jnp.ndarray | None = None,
        *,
        causal: bool = False,
    ) -> jnp.ndarray:
        """x: [B, Tq, D] queries; context: [B, Tk, D] source of keys and values (None:
        self-attention on x); mask: bool broadcastable to [B, H, Tq, Tk]  ->  [B, Tq, D]"""
        if context is None:
            q, k, v = self.query_key_value(x)
        else:
            q = self.query(x)
            k, v = self.key_value(context)
        return self.attend(q, k, v, mask, causal=causal)
