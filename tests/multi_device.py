"""Checks that need several devices, run by test_training_parallel.py in a child process that
fakes two CPU devices (`--xla_force_host_platform_device_count=2`, set before JAX starts).

    python tests/multi_device.py WORKDIR

Each check raises AssertionError on failure; "ok" is printed at the end. The steps of
`check_steps` are those of `check_train`'s runs (model, optimizer, batch shapes), so that
the compilation cache the tests' conftest.py passes on compiles each program once.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flax_transformer import TransformerConfig  # noqa: E402
from flax_transformer.data import batch_stream, load_task  # noqa: E402
from flax_transformer.training import (  # noqa: E402
    TrainingConfig,
    init_model,
    init_train_state,
    make_optimizer,
    make_train_step,
)
from flax_transformer.training.buckets import optimal_bucket_lengths  # noqa: E402
from flax_transformer.training.loop import train  # noqa: E402
from flax_transformer.training.parallel import data_parallel  # noqa: E402
from flax_transformer.training.runs import latest_state  # noqa: E402
from flax_transformer.training.step import batch_arrays  # noqa: E402

MODEL = TransformerConfig.preset("tiny", dropout_rate=0.1, max_len=32, num_encoder_layers=1,
                                 num_decoder_layers=1)  # one layer each: compiles faster


def raises(fn, *needles):
    try:
        fn()
    except ValueError as err:
        assert all(n in str(err) for n in needles), err
        return
    raise AssertionError(f"no ValueError naming {needles}")


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def comparable(tree):
    """`leaves(tree)` less the key biases (row 0 of each `key_value_bias`, and of its Adam
    moments): softmax ignores them, so their exact gradient is 0 and the computed one is
    rounding noise, which Adam scales up to steps of the learning rate's size whose sign
    follows the order of the sums."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [np.asarray(x)[1:] if "key_value_bias" in jax.tree_util.keystr(path) else
            np.asarray(x) for path, x in flat]


def check_steps():
    """Two devices compute the one-device steps (dropout on, both donation modes); the state
    stays replicated, the batch is split and the gradients are all-reduced."""
    assert jax.device_count() == 2, jax.devices()
    assert data_parallel(0, 6).size == 2 and data_parallel(2, 6).size == 2
    assert data_parallel(0, 5) is None and data_parallel(1, 6) is None  # one device: as before
    raises(lambda: data_parallel(2, 5), "batch_size=5", "devices=2", "--batch-size")
    raises(lambda: data_parallel(3, 6), "devices=3", "2 cpu device(s)", "--devices 2")

    parallel = data_parallel(2, 8)
    task = load_task("copy", max_examples=40)
    model = MODEL.replace(src_vocab_size=task.src_vocab_size, tgt_vocab_size=task.tgt_vocab_size)
    config = run_config(steps=3, devices=0)
    buckets = optimal_bucket_lengths(task.train, config.num_buckets, model.max_len)
    stream = batch_stream(task.train, config.batch_size, config.seed, bucket_lengths=buckets)
    batches = [batch_arrays(next(stream)) for _ in range(3)]
    results = {}
    for devices, donate in ((None, False), (parallel, False), (parallel, True)):
        parts, params = init_model(model, config.seed)
        tx, _ = make_optimizer(config, model.d_model)
        state = init_train_state(params, tx, config.seed)
        if devices is not None:
            state = devices.replicate(state)
        step = make_train_step(parts, tx, donate_params=donate, parallel=devices)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append([float(metrics["loss_sum"]), float(metrics["grad_norm"])])
        results[donate, devices is not None] = state, losses
        if devices is not None:
            for leaf in jax.tree.leaves(state):
                assert leaf.sharding.is_fully_replicated, leaf.sharding
                assert len(leaf.sharding.device_set) == 2, leaf.sharding
        if devices is not None and not donate:
            hlo = step.lower(state, batches[0]).compile().as_text()
            assert "all-reduce" in hlo  # the gradients are summed across the devices
            src = batches[0]["src"]
            rows = f"s32[{src.shape[0] // 2},{src.shape[1]}]"
            assert rows in hlo, rows  # each device sees half the rows
    one, one_losses = results[False, False]
    for donate in (False, True):
        two, two_losses = results[donate, True]
        np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)  # and gradient norms
        assert int(one.step) == int(two.step) == 3
        for a, b in zip(comparable(one), comparable(two)):  # steps of ~0.02 to 0.07 (noam)
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def run_config(steps, devices):
    return TrainingConfig(task="copy", steps=steps, batch_size=8, max_examples=40,
                          num_buckets=1, log_every=3, eval_every=1000, checkpoint_every=1000,
                          eval_examples=8, eval_batch_size=40, lr_schedule="noam",
                          warmup_steps=4, seed=3, devices=devices, tensorboard=False)


def run(workdir, steps, devices, resume=False):
    return train(MODEL, run_config(steps, devices), workdir, resume=resume, progress=False)


def final_state(workdir):
    return latest_state(workdir)[1]  # the TrainState of the run's latest checkpoint


def check_train(root):
    """train() on two devices: its checkpoints resume bitwise on two devices and resume on
    one; a batch two devices cannot split is refused before any file is written."""
    n = 4
    straight, split = (os.path.join(root, name) for name in ("straight", "split"))
    summary = run(straight, 2 * n, devices=0)
    assert summary["test"]["loss"] > 0
    run(split, n, devices=2)
    run(split, 2 * n, devices=2, resume=True)
    a, b = final_state(straight), final_state(split)
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    run(split, 2 * n + 2, devices=1, resume=True)  # a two-device checkpoint on one device
    assert int(final_state(split).step) == 2 * n + 2
    bad = os.path.join(root, "bad")
    config = TrainingConfig(task="copy", steps=2, batch_size=7, devices=2, tensorboard=False)
    raises(lambda: train(MODEL, config, bad, progress=False), "batch_size=7", "devices=2")
    assert not os.path.exists(bad)


if __name__ == "__main__":
    check_steps()
    check_train(sys.argv[1])
    print("ok")
