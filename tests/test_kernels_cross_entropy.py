import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_transformer.kernels import softmax_cross_entropy


def reference(logits, targets, eps):
    z = np.asarray(logits, np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    vocab = z.shape[-1]
    q = (1 - eps) * np.eye(vocab)[targets] + eps / vocab
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    return -(q * log_p).sum(-1), nll, log_p.argmax(-1) == targets


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_matches_float64_reference(rng, eps):
    logits = (rng.normal(size=(3, 5, 11)) * 3).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    loss, nll, correct = softmax_cross_entropy(logits, targets, label_smoothing=eps)
    ref_loss, ref_nll, ref_correct = reference(logits, targets, eps)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, ref_correct)


def test_gradients_match_autodiff_of_the_textbook_form(rng):
    logits = rng.normal(size=(4, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (4,))
    weights = rng.random(4).astype(np.float32)

    def textbook(z):
        q = 0.9 * jax.nn.one_hot(targets, 9) + 0.1 / 9
        log_p = jax.nn.log_softmax(z)
        return (-(q * log_p).sum(-1) * weights).sum() + 0.3 * (
            -jnp.take_along_axis(log_p, targets[:, None], -1)[:, 0]).sum()

    def ours(z):
        loss, nll, _ = softmax_cross_entropy(z, targets, label_smoothing=0.1)
        return (loss * weights).sum() + 0.3 * nll.sum()

    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(textbook)(logits),
                               rtol=1e-5, atol=1e-6)


def test_numerical_gradients_in_float64():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        logits = rng.normal(size=(2, 3, 6))
        targets = rng.integers(0, 6, (2, 3))
        fn = lambda z: softmax_cross_entropy(z, targets, label_smoothing=0.2)[:2]  # noqa: E731
        check_grads(fn, (logits,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


def test_large_logits_are_stable_and_bfloat16_runs():
    logits = jnp.array([[1e4, 0.0, -1e4]], jnp.float32)
    loss, nll, correct = softmax_cross_entropy(logits, jnp.array([0]), label_smoothing=0.1)
    assert np.isfinite(loss).all() and float(nll[0]) == 0.0 and bool(correct[0])
    out = softmax_cross_entropy(logits.astype(jnp.bfloat16), jnp.array([1]))
    assert out[0].dtype == jnp.float32 and np.isfinite(out[0]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="disagree"):
        softmax_cross_entropy(jnp.zeros((2, 5)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        softmax_cross_entropy(jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32), label_smoothing=1.0)


def test_bad_targets_and_smoothing_are_refused():
    logits = jnp.zeros((2, 3, 8))
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 8\).*from 0 to 8"):
        softmax_cross_entropy(logits, jnp.array([[8, 5, 0], [2, 0, 0]]))
    with pytest.raises(ValueError, match="from -1 to 5"):
        softmax_cross_entropy(logits, np.array([[-1, 5, 0], [2, 0, 0]]))
    with pytest.raises(ValueError, match="targets must be integer ids"):
        softmax_cross_entropy(logits, jnp.full((2, 3), 2.9))
    for value in ("0.1", None, True, 1.0):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            softmax_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), label_smoothing=value)
    # traced targets are not read back; under jit only the dtype is checked
    loss = jax.jit(lambda z, y: softmax_cross_entropy(z, y)[0])(logits, jnp.ones((2, 3), int))
    np.testing.assert_allclose(np.asarray(loss), np.log(8.0), rtol=1e-6)
