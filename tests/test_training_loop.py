"""Learning the copy task, checkpoint round trips, and bitwise-identical resume."""

import json
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from flax_transformer import TransformerConfig
from flax_transformer.data import batch_stream, load_task, make_batches
from flax_transformer.training import (
    TrainingConfig,
    init_model,
    init_train_state,
    loop,
    make_eval_step,
    make_optimizer,
    make_train_step,
)
from flax_transformer.training.checkpoint import Checkpointer
from flax_transformer.training.loop import train
from flax_transformer.training.loss import summarize
from flax_transformer.training.step import batch_arrays, sum_metrics


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def _setup(task, seed=0, **training):
    model = TransformerConfig.preset("tiny", d_model=64, d_ff=128, max_len=32,
                                     src_vocab_size=task.src_vocab_size,
                                     tgt_vocab_size=task.tgt_vocab_size)
    config = TrainingConfig(task="copy", seed=seed, **training)
    parts, params = init_model(model, seed)
    tx, _ = make_optimizer(config, model.d_model)
    return parts, tx, init_train_state(params, tx, seed)


def test_tiny_model_learns_copy_task():
    task = load_task("copy", num_symbols=10, min_len=1, max_len=10, sizes=(2000, 200, 0))
    steps, buckets = 400, (11,)
    parts, tx, state = _setup(task, steps=steps, lr_schedule="cosine", learning_rate=5e-3,
                              warmup_steps=50, label_smoothing=0.0)
    train_step = make_train_step(parts, tx, label_smoothing=0.0)
    eval_step = make_eval_step(parts, label_smoothing=0.0)
    stream = batch_stream(task.train, 32, seed=0, bucket_lengths=buckets)
    for _ in range(steps):
        state, _ = train_step(state, batch_arrays(next(stream)))
    batches = make_batches(task.valid, 100, bucket_lengths=buckets)
    result = summarize(sum_metrics([eval_step(state.params, batch_arrays(b)) for b in batches]))
    assert result["accuracy"] >= 0.99, result
    assert int(state.step) == steps


def test_donating_params_or_not_gives_identical_states():
    task = load_task("copy", max_examples=64)
    stream = batch_stream(task.train, 8, seed=0, bucket_lengths=(24,))
    batches = [batch_arrays(next(stream)) for _ in range(3)]
    states = {}
    for donate in (True, False):
        parts, tx, state = _setup(task, steps=10)
        train_step = make_train_step(parts, tx, donate_params=donate)
        for batch in batches:
            old, (state, _) = state, train_step(state, batch)
        # The optimizer state is always donated; the parameters only when asked.
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.opt_state))
        assert all(leaf.is_deleted() == donate for leaf in jax.tree.leaves(old.params))
        states[donate] = state
    assert _leaves_equal(states[True], states[False])


def test_grad_norm_metric_is_optional_and_changes_nothing_else():
    parts, tx, state, batch = _tiny_state_and_batch()
    plain_tx = optax.adamw(1e-3)  # no clipping: the metric is the only use of the norm
    results, square_roots = {}, {}
    for with_norm in (True, False):
        step = make_train_step(parts, plain_tx, grad_norm=with_norm)
        current = init_train_state(state.params, plain_tx, 0)
        for _ in range(2):
            current, metrics = step(current, batch)
        results[with_norm] = current, metrics
        square_roots[with_norm] = step.lower(current, batch).as_text().count("stablehlo.sqrt")
    assert square_roots[True] == square_roots[False] + 1  # the norm's computation is gone
    (with_state, with_metrics), (without_state, without_metrics) = results[True], results[False]
    assert _leaves_equal(with_state, without_state)
    assert set(with_metrics) - set(without_metrics) == {"grad_norm"}
    grads_norm = float(with_metrics["grad_norm"])
    assert np.isfinite(grads_norm) and grads_norm > 0
    for key, value in without_metrics.items():
        assert np.array_equal(np.asarray(value), np.asarray(with_metrics[key])), key


def test_checkpoint_round_trip_is_identical(tmp_path):
    task = load_task("copy", max_examples=64)
    parts, tx, state = _setup(task, accumulate_steps=2, steps=10)
    train_step = make_train_step(parts, tx)
    stream = batch_stream(task.train, 8, seed=0, bucket_lengths=(24,))
    for _ in range(3):
        state, _ = train_step(state, batch_arrays(next(stream)))
    checkpointer = Checkpointer(tmp_path, keep=2)
    assert checkpointer.save(state) == 3
    _, _, fresh = _setup(task, accumulate_steps=2, steps=10)
    restored = checkpointer.restore(fresh)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _leaves_equal(restored, state)
    assert not _leaves_equal(fresh.params, state.params)
    checkpointer.close()


def test_an_abstract_model_is_a_restore_target_that_draws_no_parameters(tmp_path):
    """init_model(abstract=True), what --predict, --evaluate and --resume restore into: the
    eager model's parameter shapes, graphdefs and dropout streams (bit for bit), and a state
    target from which a checkpoint restores exactly."""
    model = TransformerConfig.preset("tiny", d_model=64, d_ff=128, max_len=32, dropout_rate=0.1,
                                     src_vocab_size=20, tgt_vocab_size=20)
    parts, params = init_model(model, 5)
    abstract_parts, shapes = init_model(model, 5, abstract=True)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(params)]
    assert abstract_parts.train_graphdef == parts.train_graphdef
    assert abstract_parts.eval_graphdef == parts.eval_graphdef

    def raw(tree):  # typed keys as their uint32 data
        return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x, tree)

    assert jax.tree.leaves(parts.rest)  # dropout streams to compare
    assert _leaves_equal(raw(abstract_parts.rest), raw(parts.rest))

    tx = optax.adam(1e-3)
    state = init_train_state(params, tx, 5)
    target = init_train_state(shapes, tx, 5)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(target))
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(state)
    assert _leaves_equal(checkpointer.restore(target), state)
    checkpointer.close()


def test_train_state_holds_plain_arrays_before_and_after_a_step():
    # Variables in a jitted step's arguments cost a Python rebuild per leaf per call.
    task = load_task("copy", max_examples=16)
    parts, tx, state = _setup(task, accumulate_steps=2, steps=10)
    stream = batch_stream(task.train, 8, seed=0, bucket_lengths=(24,))
    for current in (state, make_train_step(parts, tx)(state, batch_arrays(next(stream)))[0]):
        leaves = jax.tree.leaves(current, is_leaf=lambda x: isinstance(x, nnx.Variable))
        assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_checkpoints_written_with_variables_still_restore(tmp_path):
    """Checkpoints saved before TrainState held plain arrays (params and Adam's moments were
    nnx.Param objects, the state `nnx.split` gives) restore bitwise into today's state."""
    task = load_task("copy", max_examples=16)
    parts, tx, state = _setup(task, accumulate_steps=2, steps=10)
    model = parts.model(state.params)
    _, variables, _ = nnx.split(model, nnx.Param, ...)  # the old TrainState.params
    old = init_train_state(variables, tx, seed=0)
    assert any(isinstance(x, nnx.Param) for x in
               jax.tree.leaves(old, is_leaf=lambda x: isinstance(x, nnx.Param)))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(old)
    restored = checkpointer.restore(state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _leaves_equal(restored, state)
    checkpointer.close()


def test_restoring_into_a_different_model_raises(tmp_path, capfd):
    task = load_task("copy", max_examples=16)
    _, _, state = _setup(task, steps=10)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state)
    model = TransformerConfig.preset("tiny", d_model=64, d_ff=128, max_len=32,
                                     num_encoder_layers=1, src_vocab_size=task.src_vocab_size,
                                     tgt_vocab_size=task.tgt_vocab_size)
    parts, params = init_model(model, 0)
    tx, _ = make_optimizer(TrainingConfig(task="copy", steps=10), model.d_model)
    with pytest.raises(ValueError) as info:
        checkpointer.restore(init_train_state(params, tx, 0))
    # orbax's error for today's layout (it names the missing layer), not the one for the
    # Variable layout tried after it (whose paths end in `value`)
    message = str(info.value)
    assert "layers" in message and not re.search(r"[.'/]value\b", message)
    assert "does not fit this model" in message
    # Found from the checkpoint's metadata: no failed restores, and their pages of
    # tracebacks, before the one line.
    assert len(capfd.readouterr().err.splitlines()) < 10
    checkpointer.close()


# One layer each: the resume and checkpoint checks need no depth, and compile twice as fast.
RESUME_MODEL = TransformerConfig.preset("tiny", dropout_rate=0.1, max_len=32,
                                        num_encoder_layers=1, num_decoder_layers=1)


def _resume_run(workdir, steps, resume=False):
    model = RESUME_MODEL
    config = TrainingConfig(task="copy", steps=steps, batch_size=8, max_examples=40,
                            num_buckets=1, log_every=3, eval_every=1000, checkpoint_every=1000,
                            eval_examples=8, eval_batch_size=40, lr_schedule="noam",
                            warmup_steps=4, seed=3)
    return train(model, config, workdir, resume=resume, progress=False)


def _final_state(workdir, steps):
    model = RESUME_MODEL
    task = load_task("copy", max_examples=40)
    model = model.replace(src_vocab_size=task.src_vocab_size, tgt_vocab_size=task.tgt_vocab_size)
    config = TrainingConfig(task="copy", steps=steps, seed=3, lr_schedule="noam", warmup_steps=4)
    parts, params = init_model(model, 3)
    tx, _ = make_optimizer(config, model.d_model)
    checkpointer = Checkpointer(workdir, create=False)
    try:
        return checkpointer.restore(init_train_state(params, tx, 3))
    finally:
        checkpointer.close()


def test_two_n_steps_equal_n_then_resume_n(tmp_path):
    n = 6  # 40 examples / batch 8 = 5 batches per epoch: the resume crosses an epoch
    straight, split = tmp_path / "straight", tmp_path / "split"
    _resume_run(straight, 2 * n)
    _resume_run(split, n)
    summary = _resume_run(split, 2 * n, resume=True)
    assert summary["start_step"] == n and summary["steps"] == 2 * n
    a, b = _final_state(straight, 2 * n), _final_state(split, 2 * n)
    assert int(a.step) == int(b.step) == 2 * n
    assert _leaves_equal(a, b)

    # Resuming a run that has reached `steps` is refused before its saved config changes.
    saved = (split / "config.json").read_text()
    with pytest.raises(ValueError, match=rf"at step {2 * n}, and steps={n}: nothing to train"):
        _resume_run(split, n, resume=True)
    assert (split / "config.json").read_text() == saved


def test_interrupted_run_saves_its_step_and_resumes_bitwise(tmp_path, monkeypatch):
    """Ctrl-C between checkpoints (every 1000 steps here) keeps the steps trained so far."""
    n = 4
    original = loop.batch_stream

    def interrupted_stream(*args, **kwargs):
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == n:
                raise KeyboardInterrupt
            yield batch

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(loop, "batch_stream", interrupted_stream)
    with pytest.raises(KeyboardInterrupt):
        _resume_run(interrupted, 3 * n)
    checkpointer = Checkpointer(interrupted, create=False)
    assert checkpointer.all_steps() == [n]
    checkpointer.close()
    monkeypatch.setattr(loop, "batch_stream", original)
    summary = _resume_run(interrupted, 3 * n, resume=True)
    assert summary["start_step"] == n
    straight = tmp_path / "straight"
    _resume_run(straight, 3 * n)
    assert _leaves_equal(_final_state(straight, 3 * n), _final_state(interrupted, 3 * n))


def _tiny_state_and_batch(seed=0):
    model = TransformerConfig.preset("tiny", dropout_rate=0.1, max_len=16)
    parts, params = init_model(model, seed)
    tx, _ = make_optimizer(TrainingConfig(task="copy", steps=10), model.d_model)
    rng = np.random.default_rng(seed)
    batch = {k: rng.integers(4, 32, (4, 12)).astype(np.int32) for k in ("src", "tgt_in", "tgt_out")}
    return parts, tx, init_train_state(params, tx, seed), batch


def _array_parameter_copies(hlo: str) -> list[str]:
    """Entry parameters (not scalars) that the compiled step copies."""
    entry = hlo[hlo.index("\nENTRY"):]
    arrays = set(re.findall(r"%(\S+) = \w+\[\d[\d,]*\]\S* parameter\(\d+\)", entry))
    return [name for name in re.findall(r" copy\(%(\S+?)\)", entry) if name in arrays]


def test_kept_parameters_do_not_take_the_optimizer_state_buffers():
    """With the parameters kept (CPU default), each donated moment buffer receives its own new
    value: were the new parameters listed first, they would take the moments' buffers and XLA
    would copy every moment tensor at the start of each step."""
    parts, tx, state, batch = _tiny_state_and_batch()
    step = make_train_step(parts, tx, donate_params=False)
    hlo = step.lower(state, batch).compile().as_text()
    assert _array_parameter_copies(hlo) == []


def test_steps_refuse_bad_batches_before_they_reach_the_parameters():
    """An id past the vocabulary would make the loss, and then every parameter, NaN."""
    parts, tx, state, batch = _tiny_state_and_batch()
    vocab = parts.config.tgt_vocab_size
    train_step, eval_step = make_train_step(parts, tx), make_eval_step(parts)
    bad = [
        ({**batch, "tgt_out": np.where(batch["tgt_out"] == 5, vocab + 8, batch["tgt_out"])},
         r"batch\['tgt_out'\] holds token ids in \[\d+, 40\]"),
        ({**batch, "src": batch["src"].copy() - 10}, r"batch\['src'\] holds token ids in \[-"),
        ({**batch, "tgt_in": batch["tgt_in"].astype(np.float32)}, "integer token ids"),
        ({**batch, "tgt_in": batch["tgt_in"][:, :-1]}, "batch shapes do not match"),
        ({**batch, "src": batch["src"][:2]}, "batch shapes do not match"),
        ({k: v for k, v in batch.items() if k != "tgt_out"}, "a batch maps"),
    ]
    for bad_batch, message in bad:
        with pytest.raises(ValueError, match=message):
            train_step(state, bad_batch)
        with pytest.raises(ValueError, match=message):
            eval_step(state.params, bad_batch)
    # nothing was donated by the refused calls: the state still trains, to finite values
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss_sum"]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    # device arrays are checked for shape only (their ids are not read back)
    device_batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="batch shapes do not match"):
        train_step(state, {**device_batch, "src": device_batch["src"][:2]})
    train_step(state, device_batch)


def test_unjitted_steps_check_their_batches_and_label_smoothing_is_checked_up_front():
    parts, tx, state, batch = _tiny_state_and_batch()
    bad = {**batch, "tgt_out": batch["tgt_out"] + parts.config.tgt_vocab_size}
    with pytest.raises(ValueError, match=r"batch\['tgt_out'\] holds token ids"):
        make_train_step(parts, tx, jit=False)(state, bad)
    with pytest.raises(ValueError, match=r"batch\['tgt_out'\] holds token ids"):
        make_eval_step(parts, jit=False)(state.params, bad)
    for value in (1.5, -0.1, "0.1", None):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            make_train_step(parts, tx, label_smoothing=value)
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            make_eval_step(parts, label_smoothing=value)


def test_ctrl_c_inside_a_step_saves_that_step(tmp_path, monkeypatch):
    """SIGINT while a step runs (its donated inputs already consumed) used to leave nothing
    to save; now the loop stops after the step and saves it."""
    import signal

    n = 3
    original = loop.make_train_step

    def make_interrupted_step(*args, **kwargs):
        step = original(*args, **kwargs)

        def interrupted(state, batch):
            number = int(state.step)
            new = step(state, batch)  # `state` is donated: gone from here on
            if number == n - 1:
                signal.raise_signal(signal.SIGINT)  # arrives while the step is in flight
            return new

        return interrupted

    monkeypatch.setattr(loop, "make_train_step", make_interrupted_step)
    previous = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in the background
    with pytest.raises(KeyboardInterrupt):
        _resume_run(tmp_path / "run", 3 * n)
    assert signal.getsignal(signal.SIGINT) is previous  # put back
    checkpointer = Checkpointer(tmp_path / "run", create=False)
    assert checkpointer.all_steps() == [n]
    checkpointer.close()


def test_a_second_ctrl_c_interrupts_at_once():
    import signal

    previous = signal.getsignal(signal.SIGINT)
    interrupts = loop._DeferredInterrupt()
    try:
        signal.raise_signal(signal.SIGINT)
        assert interrupts.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_failing_validation_loses_no_training(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(loop, "evaluate", failing)
    model = TransformerConfig.preset("tiny", max_len=32)
    config = TrainingConfig(task="copy", steps=8, batch_size=8, max_examples=40, num_buckets=1,
                            eval_every=4, checkpoint_every=4, eval_examples=8)
    with pytest.raises(RuntimeError, match="validation failed"):
        train(model, config, tmp_path, progress=False)
    checkpointer = Checkpointer(tmp_path, create=False)
    assert checkpointer.all_steps() == [4]  # saved before the validation that failed
    checkpointer.close()


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(tmp_path):
    run, source = tmp_path / "run", tmp_path / "source"
    _resume_run(run, 2)
    _resume_run(source, 2)
    wide = TransformerConfig.preset("tiny", max_len=32, d_model=64)
    config = TrainingConfig(task="copy", steps=2, max_examples=40, init_from=str(source))
    with pytest.raises(ValueError, match="do not fit this model"):  # found after the data loads
        train(wide, config, run, progress=False, overwrite=True)
    checkpointer = Checkpointer(run, create=False)
    assert checkpointer.all_steps() == [2]  # still there
    checkpointer.close()


def test_a_fresh_start_replaces_the_logs_of_one_that_saved_nothing(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # written as a run starts, before its logs
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 250}\n')
    _resume_run(tmp_path, 3)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 250 not in steps and steps[0] == 3


def test_an_unreadable_checkpoint_is_moved_aside_when_its_step_is_saved_again(tmp_path):
    _resume_run(tmp_path, 2)
    model = RESUME_MODEL
    config = TrainingConfig(task="copy", steps=4, batch_size=8, max_examples=40,
                            num_buckets=1, log_every=3, eval_every=1000, checkpoint_every=2,
                            eval_examples=8, eval_batch_size=40, lr_schedule="noam",
                            warmup_steps=4, seed=3)
    train(model, config, tmp_path, resume=True, progress=False)  # checkpoints 2 and 4
    for path in (tmp_path / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"")  # damaged
    summary = train(model, config.replace(steps=6), tmp_path, resume=True, progress=False)
    assert summary["start_step"] == 2 and summary["steps"] == 6  # from the readable step 2
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".unreadable." in p.name]
    assert len(aside) == 1 and aside[0].startswith("4.unreadable.")
    checkpointer = Checkpointer(tmp_path, create=False, keep=5)
    assert 4 in checkpointer.all_steps() and checkpointer.latest_step() == 6
    checkpointer.close()


def test_a_diverging_run_stops_before_its_lost_weights_overwrite_a_checkpoint(tmp_path):
    _resume_run(tmp_path, 2)  # a healthy start, checkpoint 2
    config = TrainingConfig(task="copy", steps=12, batch_size=8, max_examples=40,
                            num_buckets=1, log_every=5, eval_every=1000, checkpoint_every=1,
                            eval_examples=8, eval_batch_size=40, lr_schedule="constant",
                            learning_rate=1e30, seed=3)
    with pytest.raises(loop.TrainingDiverged, match=r"training diverged by step \d+: the "
                       r"loss or gradient norm is not finite .*the checkpoint of step \d+ is "
                       r"kept; lower the rate and continue with --resume"):
        train(RESUME_MODEL, config, tmp_path, resume=True, progress=False)
    checkpointer = Checkpointer(tmp_path, create=False, keep=20)
    steps = checkpointer.all_steps()
    checkpointer.close()
    assert steps and max(steps) < 12
    for step in steps:  # every saved step is whole: nothing non-finite was written
        state = _final_state(tmp_path, 12)
        checkpointer = Checkpointer(tmp_path, create=False, keep=20)
        state = checkpointer.restore(state, step=step)
        checkpointer.close()
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] > 2 and records[-1]["loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2  # the healthy run's


def test_a_run_diverging_before_its_first_checkpoint_says_so_in_one_sentence(tmp_path):
    config = TrainingConfig(task="copy", steps=4, batch_size=8, max_examples=40,
                            num_buckets=1, log_every=2, eval_every=1000,
                            checkpoint_every=1000, eval_examples=8, eval_batch_size=40,
                            lr_schedule="constant", learning_rate=1e30, warmup_steps=1,
                            grad_clip=0.0, seed=3)
    with pytest.raises(loop.TrainingDiverged, match=r"\(learning rate [^)]*\); no checkpoint "
                       r"was saved: start again with a lower --learning-rate"):
        train(RESUME_MODEL, config, tmp_path, progress=False)


def test_strict_json_summary_values():
    assert loop._strict({"a": float("nan"), "b": [1.0, float("inf")], "c": "x", "d": 2}) == {
        "a": None, "b": [1.0, None], "c": "x", "d": 2}
