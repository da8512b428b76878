"""Label-smoothed softmax cross-entropy with a hand-written backward pass.

For logits z [N, V], target y, smoothing eps and q = (1 - eps) onehot(y) + eps / V:

    lse   = log sum_v exp(z_v)
    loss  = -sum_v q_v log softmax(z)_v = lse - (1 - eps) z_y - eps mean_v(z_v)
    nll   = lse - z_y
    dloss/dz = softmax(z) - q

Autodiff of the textbook form materialises log-probabilities, a one-hot scatter and several
passes over the [N, V] logits in the backward pass. Here the forward keeps only the logits and
lse, and the backward is one fused elementwise pass (the one-hot is an iota comparison).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _float(logits):
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _statistics(logits, targets, label_smoothing):
    z = _float(logits)
    z_max = jnp.max(z, axis=-1)
    lse = z_max + jnp.log(jnp.sum(jnp.exp(z - z_max[..., None]), axis=-1))
    z_target = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = lse - z_target
    loss = nll if label_smoothing == 0.0 else (
        lse - (1.0 - label_smoothing) * z_target - label_smoothing * jnp.mean(z, axis=-1))
    correct = z_target >= z_max  # the target has the largest logit (argmax, ties counted)
    return loss, nll, correct, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _loss_and_stats(logits, targets, label_smoothing):
    loss, nll, correct, _ = _statistics(logits, targets, label_smoothing)
    return loss, nll, correct


def _forward(logits, targets, label_smoothing):
    loss, nll, correct, lse = _statistics(logits, targets, label_smoothing)
    return (loss, nll, correct), (logits, targets, lse)


def _backward(label_smoothing, residuals, cotangents):
    logits, targets, lse = residuals
    g_loss, g_nll, _ = cotangents  # `correct` is boolean: no gradient
    z = _float(logits)
    p = jnp.exp(z - lse[..., None])
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == targets[..., None]
    vocab = z.shape[-1]
    # d loss = p - (1-eps) onehot - eps/V ;  d nll = p - onehot
    grad = ((g_loss + g_nll)[..., None] * p
            - jnp.where(is_target, ((1.0 - label_smoothing) * g_loss + g_nll)[..., None], 0.0)
            - (label_smoothing / vocab) * g_loss[..., None])
    return grad.astype(logits.dtype), None


_loss_and_stats.defvjp(_forward, _backward)


def check_label_smoothing(label_smoothing) -> float:
    """`label_smoothing` as a float; ValueError unless a number in [0, 1) (it is static)."""
    if (isinstance(label_smoothing, (bool, np.bool_))
            or not isinstance(label_smoothing, (int, float, np.integer, np.floating))
            or not 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1) (a Python float: it is "
                         f"static), got {label_smoothing!r}")
    return float(label_smoothing)


def softmax_cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, *, label_smoothing: float = 0.0
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per-position label-smoothed loss, plain negative log-likelihood, and correctness.

    logits: [..., V] (any float dtype; computed in float32); targets: [...] int ids in [0, V)
    -> (loss [...] float32, nll [...] float32, correct [...] bool). Differentiable in logits.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {logits.shape} and targets {targets.shape} disagree: logits must be "
            "[..., vocab] for targets [...]"
        )
    label_smoothing = check_label_smoothing(label_smoothing)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer ids, got dtype {targets.dtype}")
    if not isinstance(targets, jax.core.Tracer) and targets.size:
        low, high = int(np.min(targets)), int(np.max(targets))  # concrete: checked on the host
        if low < 0 or high >= logits.shape[-1]:
            raise ValueError(f"target ids must be in [0, {logits.shape[-1]}) (the vocabulary "
                             f"of the logits), got ids from {low} to {high}")
    return _loss_and_stats(logits, targets.astype(jnp.int32), label_smoothing)
