"""Label-smoothed cross-entropy that ignores padding, and token accuracy (all in float32).

With smoothing eps over a vocabulary of V tokens the target distribution is
q = (1 - eps) * onehot(y) + eps / V, and the loss of one position is
-sum_v q_v log p_v = (1 - eps) * (-log p_y) + eps * mean_v(-log p_v).
Positions whose target is the pad id contribute nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..kernels.cross_entropy import softmax_cross_entropy

PAD_ID = 0


def cross_entropy_stats(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    label_smoothing: float = 0.0,
    pad_id: int = PAD_ID,
) -> dict[str, jnp.ndarray]:
    """Summed statistics of one batch, for averaging over any number of batches.

    logits: [B, T, V] (any float dtype; computed in float32); targets: [B, T] int ids.
    Returns float32 scalars: `loss_sum` (label-smoothed), `nll_sum` (plain cross-entropy),
    `correct` (the target has the largest logit) and `tokens`, each summed over non-pad
    positions. The kernel `softmax_cross_entropy` validates shapes and `label_smoothing`.
    """
    loss, nll, correct = softmax_cross_entropy(logits, targets, label_smoothing=label_smoothing)
    weights = (targets != pad_id).astype(jnp.float32)
    correct = correct.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "nll_sum": jnp.sum(nll * weights),
        "correct": jnp.sum(correct * weights),
        "tokens": jnp.sum(weights),
    }


def cross_entropy(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    label_smoothing: float = 0.0,
    pad_id: int = PAD_ID,
) -> jnp.ndarray:
    """Mean label-smoothed cross-entropy per non-pad target token (0 if there is none)."""
    stats = cross_entropy_stats(logits, targets, label_smoothing=label_smoothing, pad_id=pad_id)
    return stats["loss_sum"] / jnp.maximum(stats["tokens"], 1.0)


def token_accuracy(logits: jnp.ndarray, targets: jnp.ndarray, *, pad_id: int = PAD_ID):
    """Fraction of non-pad positions whose argmax is the target (0 if there is none)."""
    stats = cross_entropy_stats(logits, targets, pad_id=pad_id)
    return stats["correct"] / jnp.maximum(stats["tokens"], 1.0)


def summarize(stats: dict[str, float]) -> dict[str, float | int]:
    """Host-side means from summed statistics: loss, nll (per token), accuracy; and tokens,
    the count of non-pad target tokens."""
    tokens = max(float(stats["tokens"]), 1.0)
    return {
        "loss": float(stats["loss_sum"]) / tokens,
        "nll": float(stats["nll_sum"]) / tokens,
        "accuracy": float(stats["correct"]) / tokens,
        "tokens": round(float(stats["tokens"])),  # a count (summed as float32 on device)
    }
