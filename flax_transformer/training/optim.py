"""Learning-rate schedules and the Optax optimizer chain, built from a `TrainingConfig`.

Schedules take the optimizer's update count (0, 1, 2, ...) and use step = count + 1, so the
first update already has a non-zero learning rate, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from .config import TrainingConfig

Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> Schedule:
    """The paper's lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1 for the noam schedule, got {warmup_steps}")
    if not d_model >= 1 or not scale > 0:
        raise ValueError(f"noam schedule: need d_model >= 1 and scale > 0, got d_model="
                         f"{d_model!r}, scale={scale!r}")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def _warmup(peak: float, warmup_steps: int, step: jnp.ndarray) -> jnp.ndarray:
    """Linear ramp to `peak` over `warmup_steps` (peak at once if warmup_steps == 0)."""
    return peak * jnp.minimum(1.0, step / max(warmup_steps, 1))


def rsqrt_schedule(peak: float, warmup_steps: int) -> Schedule:
    """Linear warmup to `peak`, then peak * sqrt(warmup_steps / step)."""

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        decay = jnp.sqrt(max(warmup_steps, 1) / jnp.maximum(step, max(warmup_steps, 1)))
        return _warmup(peak, warmup_steps, step) * decay

    return schedule


def cosine_schedule(peak: float, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0, cycles: int = 1) -> Schedule:
    """Linear warmup to `peak`, then a half cosine down to `peak * min_ratio` at total_steps.

    With `cycles > 1` the updates split into that many equal cycles, each a copy of the
    warmup + cosine (warm restarts, Loshchilov & Hutter 2017): the first cycle of a run with
    total_steps = k * n and cycles = k is exactly the single-cycle schedule over n steps.
    """
    if cycles < 1 or total_steps % cycles:
        raise ValueError(f"{total_steps} updates do not split into {cycles} equal cosine "
                         "cycles; make steps a multiple of lr_cycles")
    cycle_steps = total_steps // cycles
    decay_steps = max(cycle_steps - warmup_steps, 1)

    def schedule(count):
        if cycles > 1:
            count = jnp.asarray(count) % cycle_steps
        step = jnp.asarray(count, jnp.float32) + 1.0
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step <= warmup_steps, _warmup(peak, warmup_steps, step), peak * cosine)

    return schedule


def constant_schedule(peak: float, warmup_steps: int) -> Schedule:
    """Linear warmup to `peak`, then constant."""

    def schedule(count):
        return _warmup(peak, warmup_steps, jnp.asarray(count, jnp.float32) + 1.0)

    return schedule


def make_schedule(config: TrainingConfig, d_model: int) -> Schedule:
    """The learning-rate schedule named by `config.lr_schedule`, over optimizer updates."""
    name = config.lr_schedule
    if name == "noam":
        return noam_schedule(d_model, config.warmup_steps, config.learning_rate)
    if name == "rsqrt":
        return rsqrt_schedule(config.learning_rate, config.warmup_steps)
    if name == "cosine":
        return cosine_schedule(config.learning_rate, config.warmup_steps, config.num_updates,
                               config.min_lr_ratio, config.lr_cycles)
    if name == "constant":
        return constant_schedule(config.learning_rate, config.warmup_steps)
    raise ValueError(f"lr_schedule={name!r} is not known")


def decay_mask(params):
    """True for weight matrices and embeddings (decayed by AdamW); False for vectors (biases,
    LayerNorm scales) and for any leaf whose name ends in "bias" (e.g. the attention's
    [2, D] key/value bias)."""

    def decayed(path, p) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", "")) if path else ""
        return jnp.ndim(p) >= 2 and not str(name).endswith("bias")

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    config: TrainingConfig, d_model: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """(tx, schedule): optional global-norm clipping, then Adam or AdamW on the schedule;
    wrapped in `optax.MultiSteps` when `accumulate_steps > 1` (gradients are averaged over
    the micro-batches and the schedule advances once per update)."""
    schedule = make_schedule(config, d_model)
    if config.optimizer == "adam":
        opt = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    elif config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                          weight_decay=config.weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"optimizer={config.optimizer!r} is not known")
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    tx = optax.chain(*parts, opt)
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)
    return tx, schedule


def learning_rate_at(schedule: Schedule, config: TrainingConfig, step: int) -> float:
    """The learning rate used by training batch number `step` (0-based), on the host."""
    return float(schedule(step // config.accumulate_steps))
