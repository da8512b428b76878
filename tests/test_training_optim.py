"""Schedules at chosen steps, the optimizer chain (clipping, accumulation), config checks."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_transformer import TransformerConfig
from flax_transformer.training import TrainingConfig, make_optimizer, make_schedule
from flax_transformer.training.config import RUN_PRESETS, resolve_preset
from flax_transformer.training.optim import decay_mask, learning_rate_at
from flax_transformer.training.state import init_model


def paper_lr(step, d_model, warmup, scale=1.0):
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize("step", [1, 10, 3999, 4000, 4001, 10000, 100000])
def test_noam_schedule_is_the_papers_formula(step):
    config = TrainingConfig(lr_schedule="noam", warmup_steps=4000, learning_rate=1.0)
    schedule = make_schedule(config, d_model=512)
    # optax passes the update count (0-based); the paper's step number is count + 1.
    np.testing.assert_allclose(float(schedule(step - 1)), paper_lr(step, 512, 4000), rtol=1e-6)


def test_noam_peak_and_scale():
    config = TrainingConfig(lr_schedule="noam", warmup_steps=100, learning_rate=2.0)
    schedule = make_schedule(config, d_model=256)
    values = [float(schedule(c)) for c in range(300)]
    assert int(np.argmax(values)) == 99  # step 100 = warmup
    np.testing.assert_allclose(max(values), 2.0 * 256**-0.5 * 100**-0.5, rtol=1e-6)


def test_cosine_schedule_values():
    config = TrainingConfig(lr_schedule="cosine", learning_rate=1e-3, warmup_steps=10,
                            steps=110, min_lr_ratio=0.1)
    schedule = make_schedule(config, d_model=64)
    np.testing.assert_allclose(float(schedule(0)), 1e-4, rtol=1e-6)  # step 1 of 10 warmup
    np.testing.assert_allclose(float(schedule(9)), 1e-3, rtol=1e-6)  # peak at warmup
    middle = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5))
    np.testing.assert_allclose(float(schedule(59)), middle, rtol=1e-5)  # half-way down
    np.testing.assert_allclose(float(schedule(109)), 1e-4, rtol=1e-5)  # the floor at the end
    np.testing.assert_allclose(float(schedule(500)), 1e-4, rtol=1e-5)


def test_cosine_cycles_repeat_the_single_cycle_schedule():
    one = make_schedule(TrainingConfig(lr_schedule="cosine", learning_rate=1e-3, warmup_steps=10,
                                       steps=100, min_lr_ratio=0.1), d_model=64)
    two = make_schedule(TrainingConfig(lr_schedule="cosine", learning_rate=1e-3, warmup_steps=10,
                                       steps=200, min_lr_ratio=0.1, lr_cycles=2), d_model=64)
    counts = np.arange(100)
    first = np.asarray(jax.vmap(one)(counts))
    # Bitwise: continuing a finished one-cycle run with a second cycle equals a two-cycle plan.
    np.testing.assert_array_equal(np.asarray(jax.vmap(two)(counts)), first)
    np.testing.assert_array_equal(np.asarray(jax.vmap(two)(counts + 100)), first)
    np.testing.assert_allclose(float(two(100)), 1e-4, rtol=1e-6)  # restart: warmup step 1
    np.testing.assert_allclose(float(two(199)), 1e-4, rtol=1e-5)  # the floor at the end


@pytest.mark.parametrize("overrides, field", [
    (dict(lr_schedule="rsqrt", lr_cycles=2), "lr_cycles=2 needs lr_schedule='cosine'"),
    (dict(lr_schedule="cosine", steps=101, lr_cycles=2), "lr_cycles=2 must divide"),
    (dict(lr_schedule="cosine", lr_cycles=0), "lr_cycles must be a positive integer"),
])
def test_bad_lr_cycles_are_refused(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        TrainingConfig(**overrides)


def test_rsqrt_and_constant_schedules():
    rsqrt = make_schedule(TrainingConfig(lr_schedule="rsqrt", learning_rate=1e-3,
                                         warmup_steps=100), d_model=64)
    np.testing.assert_allclose(float(rsqrt(49)), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(rsqrt(99)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(rsqrt(399)), 0.5e-3, rtol=1e-6)  # sqrt(100/400)
    const = make_schedule(TrainingConfig(lr_schedule="constant", learning_rate=1e-3,
                                         warmup_steps=0), d_model=64)
    assert float(const(0)) == float(const(1000)) == pytest.approx(1e-3)


def test_learning_rate_at_counts_updates_not_micro_batches():
    config = TrainingConfig(lr_schedule="rsqrt", learning_rate=1.0, warmup_steps=10,
                            accumulate_steps=4, steps=100)
    schedule = make_schedule(config, d_model=8)
    assert learning_rate_at(schedule, config, 7) == float(schedule(1))


def _quadratic_params():
    return {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}


def test_adam_hyperparameters_and_clipping():
    config = TrainingConfig(lr_schedule="constant", learning_rate=0.1, warmup_steps=0,
                            grad_clip=1.0)
    tx, _ = make_optimizer(config, d_model=8)
    params = _quadratic_params()
    state = tx.init(params)
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, _ = tx.update(huge, state, params)
    # Adam's first step is lr * g / (|g| + eps) elementwise: ~ -lr whatever the scale.
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-5)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(huge, clip.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    base = dict(lr_schedule="constant", learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
    accumulate, _ = make_optimizer(TrainingConfig(accumulate_steps=2, steps=10, **base), 8)
    single, _ = make_optimizer(TrainingConfig(**base), 8)
    params = _quadratic_params()
    g1 = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
    g2 = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    state = accumulate.init(params)
    u1, state = accumulate.update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u1))  # no update yet
    u2, _ = accumulate.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = single.update(mean, single.init(params), params)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_adamw_decays_matrices_only():
    config = TrainingConfig(optimizer="adamw", weight_decay=0.1, lr_schedule="constant",
                            learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
    tx, _ = make_optimizer(config, 8)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.01, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0)
    assert decay_mask(params) == {"w": True, "b": False}


def test_adamw_decay_mask_on_a_real_model():
    config = TransformerConfig.preset("tiny", src_vocab_size=11, tgt_vocab_size=13,
                                      tie_output=False)
    _, params = init_model(config, 0)
    mask = jax.tree_util.tree_leaves_with_path(decay_mask(params))
    decayed = {jax.tree_util.keystr(path) for path, flag in mask if flag}
    names = {path[-1].key for path, _ in mask}
    kept = {path[-1].key for path, flag in mask if not flag}
    assert kept == {"bias", "scale", "b1", "b2", "query_bias", "key_value_bias",
                    "output_bias"} & names
    assert "key_value_bias" in kept  # [2, D]: a bias, though not a vector
    assert any("key_value_kernel" in name for name in decayed)
    assert any("embedding" in name for name in decayed)
    assert "['output']['kernel']" in decayed and "['output']['bias']" not in decayed


@pytest.mark.parametrize("overrides, field", [
    (dict(steps=0), "steps"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(weight_decay=0.1), "weight_decay"),
    (dict(accumulate_steps=8, steps=4), "accumulate_steps"),
    (dict(decode="sample"), "decode"),
    (dict(grad_clip=-1.0), "grad_clip"),
    # NaN passes every `x <= 0` test: non-finite values are refused before training
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(grad_clip=float("inf")), "grad_clip"),
    (dict(adam_eps=float("nan")), "adam_eps"),
    (dict(optimizer="adamw", weight_decay=float("nan")), "weight_decay"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
    (dict(max_examples=2.5), "max_examples"),
    (dict(eval_buckets=0), "eval_buckets must be a positive integer"),
    (dict(tensorboard="no"), "tensorboard must be True or False"),
])
def test_training_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**overrides)


def test_presets_resolve_and_unknown_ones_fail():
    for name in RUN_PRESETS:
        model, training = resolve_preset(name, None)
        assert model.param_dtype == "float32"
    model, training = resolve_preset(None, "g2p")
    assert training.task == "g2p" and training.steps == RUN_PRESETS["g2p"].training["steps"]
    _, training = resolve_preset("tiny", "copy")
    assert training.task == "copy"
    with pytest.raises(ValueError, match="preset 'nope' is not known"):
        resolve_preset("nope", None)
    with pytest.raises(ValueError, match="unknown TrainingConfig field"):
        TrainingConfig().replace(stepz=3)


def test_training_config_checks_the_task_and_paths():
    with pytest.raises(ValueError, match=r"task='nope' is not known; choose one of \["):
        TrainingConfig(task="nope")
    for name in ("train_file", "valid_file", "test_file", "data_dir"):
        for value in (0, True, "", float("nan")):
            with pytest.raises(ValueError, match=f"{name} must be a path"):
                TrainingConfig(task="translate", **{name: value})
    from pathlib import Path
    assert TrainingConfig(task="translate", train_file=Path("a.tsv")).train_file == "a.tsv"


def test_noam_schedule_refuses_a_zero_width():
    from flax_transformer.training.optim import noam_schedule

    with pytest.raises(ValueError, match="d_model >= 1 and scale > 0"):
        noam_schedule(0, 10)
    with pytest.raises(ValueError, match="d_model >= 1 and scale > 0"):
        make_optimizer(TrainingConfig(), 0)


def test_settings_that_are_valid_but_likely_wrong_are_named():
    assert TrainingConfig(lr_schedule="cosine", steps=100, warmup_steps=10).warnings() == []
    for config in (TrainingConfig(lr_schedule="cosine", steps=100, warmup_steps=100),
                   TrainingConfig(lr_schedule="cosine", steps=100, warmup_steps=30,
                                  lr_cycles=4)):
        (line,) = config.warnings()
        assert "never decays" in line and "--warmup-steps" in line
    (line,) = TrainingConfig(lr_schedule="rsqrt", steps=10, warmup_steps=1,
                             accumulate_steps=3).warnings()
    assert "the last 1 of steps=10 batches" in line and "never applied" in line
