"""Pure, jit-compiled train and eval steps over the split model.

`train_step(state, batch) -> (state, metrics)` is compiled once per bucket shape with
`jax.jit`; the optimizer state is donated and updated in place, the parameters too on GPU/TPU
(see `make_train_step`). `metrics` are device scalars (summed statistics, see `loss.py`); the
loop fetches them to the host only every `log_every` steps.

Dropout: every step reseeds the model's dropout streams with fold_in(rng, step), so the masks
depend only on the seed and the step number, and a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..config import TransformerConfig
from ..kernels.cross_entropy import check_label_smoothing
from ..nn import check_tokens
from .loss import cross_entropy_stats
from .parallel import DataParallel
from .state import ModelParts, TrainState

Batch = Mapping[str, Any]  # src, tgt_in, tgt_out: int32 [B, L]
BATCH_KEYS = ("src", "tgt_in", "tgt_out")


def batch_arrays(batch) -> dict[str, np.ndarray]:
    """The arrays a step needs from a `data.Batch` (or a mapping with those keys)."""
    if isinstance(batch, Mapping):
        return {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS}
    return {k: np.asarray(getattr(batch, k), np.int32) for k in BATCH_KEYS}


def check_batch(batch: Batch, config: TransformerConfig) -> None:
    """Host-side check of a step's batch before the compiled step runs: `src` [B, S] and
    `tgt_in`, `tgt_out` [B, T] integer ids within `config.max_len` and, for NumPy arrays (what
    the data pipeline yields), within the vocabularies (an id past the vocabulary would turn
    the loss and then every parameter into NaN). Device arrays are not read back, which
    would wait for the device every step: their ids are the caller's to check.
    Raises ValueError naming the array and the fix."""
    if not isinstance(batch, Mapping) or any(key not in batch for key in BATCH_KEYS):
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch maps {BATCH_KEYS} to [batch, length] token ids, got {got}; "
                         "build it with batch_arrays()")
    vocab = {"src": config.src_vocab_size, "tgt_in": config.tgt_vocab_size,
             "tgt_out": config.tgt_vocab_size}
    for name in BATCH_KEYS:
        tokens = batch[name]
        if isinstance(tokens, jax.Array) and not isinstance(tokens, jax.core.Tracer):
            tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)  # shape only
        check_tokens(tokens, vocab[name], config.max_len, f"batch[{name!r}]")
    src, tgt_in, tgt_out = (np.shape(batch[name]) for name in BATCH_KEYS)
    if tgt_in != tgt_out or src[0] != tgt_in[0]:
        raise ValueError(f"batch shapes do not match: src {src}, tgt_in {tgt_in}, tgt_out "
                         f"{tgt_out}; tgt_in and tgt_out are [B, T] and src is [B, S]")


def _checked(step: Callable, config: TransformerConfig,
             parallel: DataParallel | None = None) -> Callable:
    """`step(first, batch)` with `check_batch` on the host first, then, data parallel, the
    batch split across the devices."""

    def checked_step(first, batch: Batch):
        check_batch(batch, config)
        return step(first, batch if parallel is None else parallel.shard(batch))

    return checked_step


def _forward_stats(model, batch: Batch, label_smoothing: float) -> dict[str, jnp.ndarray]:
    logits = model(batch["src"], batch["tgt_in"])
    return cross_entropy_stats(logits, batch["tgt_out"], label_smoothing=label_smoothing)


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.1,
    jit: bool = True,
    donate_params: bool | None = None,
    grad_norm: bool = True,
    parallel: DataParallel | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jnp.ndarray]]]:
    """One optimizer step (or micro-step under `optax.MultiSteps`) on one batch (checked on
    the host first, see `check_batch`).

    The gradient is that of the mean label-smoothed loss per non-pad target token. Metrics:
    loss_sum, nll_sum, correct, tokens (sums over the batch) and, with `grad_norm`, the
    global gradient norm before clipping. An optimizer that clips by the global norm computes
    it anyway; without clipping the metric is an extra pass over all gradients (~4% of a
    `base` step on a 2-core CPU, benchmarks/RESULTS.md), which `grad_norm=False` leaves out.

    The optimizer state (2/3 of the state's memory under Adam) is always donated.
    `donate_params` also donates the parameters; default: on GPU/TPU, not on CPU. XLA:CPU
    cannot order an in-place parameter update after the backward pass's reads of the old
    value, so it copies the weight matrices first and orders the step around them; keeping the
    parameters made a `base` step 4-25% faster on a 2-core CPU (A/B runs in one process, see
    benchmarks/RESULTS.md) and changed nothing at smaller sizes. Each step then allocates
    fresh parameter buffers (the old ones are freed when the caller drops them). Either way
    the results are bitwise identical, and `train_step.lower(state, batch)` lowers the program
    a call with these arguments runs (batch checked and split alike), for inspection
    (`.compile().as_text()` is its HLO).

    `parallel` (see `parallel.py`): data parallel over its devices. The state must be
    replicated on them (`parallel.replicate`) and stays so; each batch is split by rows after
    its check, and XLA sums the gradients across the devices.
    """
    label_smoothing = check_label_smoothing(label_smoothing)

    def loss_fn(params, batch, dropout_key):
        rest = jax.tree.map(jnp.asarray, parts.rest)  # fresh Variables owned by this trace
        model = nnx.merge(parts.train_graphdef, params, rest)
        nnx.reseed(model, dropout=dropout_key)
        stats = _forward_stats(model, batch, label_smoothing)
        return stats["loss_sum"] / jnp.maximum(stats["tokens"], 1.0), stats

    def train_step(state: TrainState, batch: Batch):
        if parallel is not None:  # what the shardings of the arguments say, made explicit
            batch = jax.lax.with_sharding_constraint(batch, parallel.rows)
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, stats = jax.grad(loss_fn, has_aux=True)(state.params, batch, dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**stats, "grad_norm": optax.tree.norm(grads)} if grad_norm else stats
        new = TrainState(state.step + 1, params, opt_state, state.rng)
        if parallel is not None:  # one update, the same on every device
            new = jax.lax.with_sharding_constraint(new, parallel.replicated)
        return new, metrics

    if not jit:
        return _checked(train_step, parts.config, parallel)
    if donate_params is None:
        donate_params = jax.default_backend() != "cpu"
    if donate_params:
        donating = jax.jit(train_step, donate_argnums=0)
        checked_train_step = _checked(donating, parts.config, parallel)
        checked_train_step.lower = _checked(donating.lower, parts.config, parallel)
        return checked_train_step

    def split_step(params, donated, batch):
        step, opt_state, rng = donated
        new, metrics = train_step(TrainState(step, params, opt_state, rng), batch)
        # The donated state comes first among the outputs: JAX hands each donated buffer to
        # the first output of its shape and dtype, so new parameters listed first would take
        # the Adam moments' buffers, and XLA would copy every moment tensor each step.
        return (new.step, new.opt_state, new.rng), new.params, metrics

    compiled = jax.jit(split_step, donate_argnums=1)

    def arguments(state: TrainState, batch: Batch):
        return state.params, (state.step, state.opt_state, state.rng), batch

    def train_step_keeping_params(state: TrainState, batch: Batch):
        (step, opt_state, rng), params, metrics = compiled(*arguments(state, batch))
        return TrainState(step, params, opt_state, rng), metrics

    def lower(state: TrainState, batch: Batch):  # as `jax.jit(...).lower`, for inspection
        return compiled.lower(*arguments(state, batch))

    checked_train_step = _checked(train_step_keeping_params, parts.config, parallel)
    checked_train_step.lower = _checked(lower, parts.config, parallel)  # the program it runs
    return checked_train_step


def make_eval_step(
    parts: ModelParts, *, label_smoothing: float = 0.1, jit: bool = True
) -> Callable[[Any, Batch], dict[str, jnp.ndarray]]:
    """`eval_step(params, batch) -> summed statistics` with dropout off (nothing donated)."""
    label_smoothing = check_label_smoothing(label_smoothing)

    def eval_step(params, batch: Batch):
        model = nnx.merge(parts.eval_graphdef, params, parts.rest)
        return _forward_stats(model, batch, label_smoothing)

    return _checked(jax.jit(eval_step) if jit else eval_step, parts.config)


def sum_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Host-side sums of fetched step metrics (grad_norm is averaged)."""
    if not metrics:
        return {}
    host = jax.device_get(metrics)
    out = {k: float(sum(np.asarray(m[k], np.float64) for m in host)) for k in host[0]}
    if "grad_norm" in out:
        out["grad_norm"] /= len(host)
    return out
