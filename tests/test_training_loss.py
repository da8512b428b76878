"""Label-smoothed cross-entropy and token accuracy against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from flax_transformer.training.loss import (
    cross_entropy,
    cross_entropy_stats,
    summarize,
    token_accuracy,
)


def reference_loss(logits, targets, eps, pad=0):
    """Mean over non-pad positions of -sum_v q_v log p_v, q = (1-eps) onehot + eps/V."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    q = np.full(logits.shape, eps / vocab)
    np.put_along_axis(q, targets[..., None], 1 - eps + eps / vocab, axis=-1)
    per_token = -(q * log_p).sum(-1)
    mask = targets != pad
    return per_token[mask].mean(), per_token[mask].sum()


@pytest.fixture
def batch(rng):
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
    targets = rng.integers(1, 11, size=(3, 6))
    targets[0, 4:] = 0  # padding at the end of two rows
    targets[2, 1:] = 0
    return logits, targets


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_numpy(batch, eps):
    logits, targets = batch
    mean, total = reference_loss(logits, targets, eps)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps)
    np.testing.assert_allclose(float(got), mean, rtol=1e-5)
    stats = cross_entropy_stats(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps)
    np.testing.assert_allclose(float(stats["loss_sum"]), total, rtol=1e-5)
    assert float(stats["tokens"]) == (targets != 0).sum()
    nll_mean, _ = reference_loss(logits, targets, 0.0)
    np.testing.assert_allclose(summarize(stats)["nll"], nll_mean, rtol=1e-5)
    count = summarize(stats)["tokens"]  # a count, logged as an integer (metrics.jsonl)
    assert type(count) is int and count == (targets != 0).sum()


def test_padding_is_ignored(batch):
    logits, targets = batch
    changed = logits.copy()
    changed[targets == 0] = 1e4 * np.sign(changed[targets == 0])  # garbage at pad positions
    a = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.1)
    b = cross_entropy(jnp.asarray(changed), jnp.asarray(targets), label_smoothing=0.1)
    assert float(a) == float(b)


def test_token_accuracy_matches_numpy(batch):
    logits, targets = batch
    targets = targets.copy()
    targets[1, :3] = logits[1, :3].argmax(-1)  # some certain hits
    mask = targets != 0
    expected = (logits.argmax(-1) == targets)[mask].mean()
    got = token_accuracy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_all_padding_gives_zero_not_nan():
    logits = jnp.zeros((2, 3, 5))
    targets = jnp.zeros((2, 3), jnp.int32)
    assert float(cross_entropy(logits, targets, label_smoothing=0.1)) == 0.0
    assert float(token_accuracy(logits, targets)) == 0.0


def test_bfloat16_logits_are_reduced_in_float32(batch):
    logits, targets = batch
    stats = cross_entropy_stats(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                label_smoothing=0.1)
    assert all(v.dtype == jnp.float32 for v in stats.values())
    mean, _ = reference_loss(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32),
                             targets, 0.1)
    np.testing.assert_allclose(summarize(stats)["loss"], mean, rtol=1e-4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), label_smoothing=1.0)
