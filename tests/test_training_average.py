"""Checkpoint averaging (`TrainingConfig.average_checkpoints`): the run's model is the mean of
the parameters of its last checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_transformer import TransformerConfig
from flax_transformer.training import TrainingConfig
from flax_transformer.training import evaluate as evaluation
from flax_transformer.training import loop as loop_module
from flax_transformer.training.checkpoint import Checkpointer, mean_params
from flax_transformer.training.loop import train
from flax_transformer.training.runs import evaluate_run, latest_state
from flax_transformer.training.state import TrainState

MODEL = TransformerConfig.preset("tiny", d_model=32, d_ff=64, max_len=32)


def _state(step: int, seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
        opt_state={"mu": jnp.full((4,), float(step), jnp.float32)},
        rng=jnp.asarray([seed, step], jnp.uint32),
    )


def _numpy_mean(states):
    return {name: np.mean([np.asarray(s.params[name], np.float64) for s in states], axis=0)
            for name in ("w", "b")}


def test_mean_params_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    trees = [{"a": rng.normal(size=(5, 3)).astype(np.float32),
              "b": [rng.normal(size=(2,)).astype(np.float32)]} for _ in range(4)]
    mean = mean_params(trees)
    assert jax.tree.structure(mean) == jax.tree.structure(trees[0])
    expected = np.mean([t["a"].astype(np.float64) for t in trees], axis=0)
    np.testing.assert_allclose(np.asarray(mean["a"]), expected, rtol=1e-6, atol=1e-7)
    assert mean["a"].dtype == np.float32 and mean["b"][0].dtype == np.float32
    # one tree: itself
    np.testing.assert_array_equal(np.asarray(mean_params(trees[:1])["a"]), trees[0]["a"])
    with pytest.raises(ValueError, match="at least one"):
        mean_params([])


def test_restore_average_takes_the_last_checkpoints(tmp_path):
    states = [_state(step, seed) for seed, step in enumerate((10, 20, 30))]
    checkpointer = Checkpointer(tmp_path, keep=5)
    for state in states:
        checkpointer.save(state)
    like = _state(0, 99)

    averaged, steps = checkpointer.restore_average(like, 2)
    assert steps == [20, 30]
    for name, expected in _numpy_mean(states[1:]).items():
        np.testing.assert_allclose(np.asarray(averaged.params[name]), expected, rtol=1e-6)
    # everything but the parameters is the latest checkpoint's: training goes on from there
    assert int(averaged.step) == 30
    np.testing.assert_array_equal(averaged.opt_state["mu"], states[2].opt_state["mu"])
    np.testing.assert_array_equal(averaged.rng, states[2].rng)

    latest, steps = checkpointer.restore_average(like, 1)
    assert steps == [30]
    np.testing.assert_array_equal(latest.params["w"], states[2].params["w"])

    # more than are on disk: all of them
    everything, steps = checkpointer.restore_average(like, 5)
    assert steps == [10, 20, 30]
    np.testing.assert_allclose(np.asarray(everything.params["w"]), _numpy_mean(states)["w"],
                               rtol=1e-6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="average_checkpoints must be a positive integer"):
            checkpointer.restore_average(like, bad)

    # a damaged older checkpoint is named, with how many can still be averaged
    for path in (tmp_path / "checkpoints" / "20").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint 20 .*cannot be read.*"
                                         r"--average-checkpoints 1\)"):
        checkpointer.restore_average(like, 3)
    checkpointer.close()


def test_config_checks_average_checkpoints():
    assert TrainingConfig().average_checkpoints == 1
    with pytest.raises(ValueError, match="average_checkpoints must be a positive integer"):
        TrainingConfig(average_checkpoints=0)
    with pytest.raises(ValueError, match="raise keep_checkpoints to 5"):
        TrainingConfig(average_checkpoints=5, keep_checkpoints=3)
    assert TrainingConfig(average_checkpoints=5, keep_checkpoints=5).average_checkpoints == 5


def _raw_params(workdir, steps):
    """The parameters saved at each of `steps`, as written."""
    _, like, _, config = latest_state(workdir, {"average_checkpoints": 1})
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, create=False)
    try:
        return [checkpointer.restore(like, step).params for step in steps]
    finally:
        checkpointer.close()


def _max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _averaging_run(steps: int) -> TrainingConfig:
    """A tiny copy run checkpointing every 2 steps, its model the mean of the last 3."""
    return TrainingConfig(task="copy", steps=steps, batch_size=8, max_examples=40,
                          num_buckets=1, log_every=4, eval_every=1000, checkpoint_every=2,
                          keep_checkpoints=3, average_checkpoints=3, eval_examples=8,
                          eval_batch_size=40, lr_schedule="constant", learning_rate=5e-3,
                          warmup_steps=0, seed=1, tensorboard=False)


def test_a_run_reports_and_serves_the_averaged_model(tmp_path, monkeypatch):
    scored = []  # the parameters each evaluation (validation, then test) was given

    def recording(model, eval_step, params, *args):
        scored.append(params)
        return evaluation.evaluate(model, eval_step, params, *args)

    monkeypatch.setattr(loop_module, "evaluate", recording)
    summary = train(MODEL, _averaging_run(steps=8), tmp_path, progress=False)
    assert summary["averaged_steps"] == [4, 6, 8]

    raw = _raw_params(tmp_path, [4, 6, 8])
    averaged = latest_state(tmp_path)[1].params
    assert _max_difference(averaged, mean_params(raw)) == 0.0
    assert _max_difference(averaged, raw[-1]) > 1e-4  # the average is not the last step
    assert _max_difference(latest_state(tmp_path, {"average_checkpoints": 1})[1].params,
                           raw[-1]) == 0.0
    # validation during training saw the last step's parameters, the test the average
    assert len(scored) == 2
    assert _max_difference(scored[0], raw[-1]) == 0.0
    assert _max_difference(scored[1], averaged) == 0.0
    # scoring the run again reads the same averaged model
    again = evaluate_run(tmp_path)["test"]
    assert again["sequence_accuracy"] == summary["test"]["sequence_accuracy"]


def test_a_run_with_fewer_checkpoints_than_asked_says_so(tmp_path, capsys):
    summary = train(MODEL, _averaging_run(steps=4), tmp_path, progress=False)
    assert summary["averaged_steps"] == [2, 4]
    err = capsys.readouterr().err
    assert "holds 2 checkpoint(s) up to step 4, fewer than average_checkpoints=3" in err
    raw = _raw_params(tmp_path, [2, 4])
    assert _max_difference(latest_state(tmp_path)[1].params, mean_params(raw)) == 0.0
