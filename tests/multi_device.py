"""Checks that need several devices, run by test_training_parallel.py in a child process that
fakes two CPU devices (`--xla_force_host_platform_device_count=2`, set before JAX starts):
data parallel training, and decoding and evaluation with each device decoding its rows.

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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flax_transformer import Transformer, TransformerConfig  # noqa: E402
from flax_transformer.data import batch_stream, load_task  # noqa: E402
from flax_transformer.decoding import (  # noqa: E402
    beam_search,
    greedy_decode,
    sequence_log_probs,
)
from flax_transformer.decoding.beam import _compiled_beam_search  # noqa: E402
from flax_transformer.decoding.common import split_model  # noqa: E402
from flax_transformer.parallel import RowSplit  # noqa: E402
from flax_transformer.training import (  # noqa: E402
    TrainingConfig,
    init_model,
    init_train_state,
    make_optimizer,
    make_train_step,
)
from flax_transformer.training.buckets import optimal_bucket_lengths  # noqa: E402
from flax_transformer.training.evaluate import (  # noqa: E402
    EvalSet,
    decode_examples,
    evaluate_loss,
)
from flax_transformer.training.loop import train  # noqa: E402
from flax_transformer.training.parallel import data_parallel, decoding_devices  # noqa: E402
from flax_transformer.training.runs import build_task, evaluate_run, latest_state  # noqa: E402
from flax_transformer.training.step import batch_arrays, make_eval_step  # noqa: E402

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
        if devices is not None and not donate:  # before the steps: the program they run
            lowered = step.lower(state, batches[0])
            # lowered as a call runs it: the batch's arrays (src, tgt_in, tgt_out) arrive split
            signature = next(line for line in lowered.as_text().splitlines()
                             if "func.func public @main" in line)
            assert signature.count('[{"rows"}, {}]') == 3, "the batch is not split"
            hlo = lowered.compile().as_text()
            assert "all-reduce" in hlo  # the gradients are summed across the devices
            src = batches[0]["src"]
            rows = f"s32[{src.shape[0] // 2},{src.shape[1]}]"
            assert rows in hlo, rows  # each device sees half the rows
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append([float(metrics["loss_sum"]), float(metrics["grad_norm"])])
        results[donate, devices is not None] = state, losses
        if devices is not None:
            for leaf in jax.tree.leaves(state):
                assert leaf.sharding.is_fully_replicated, leaf.sharding
                assert len(leaf.sharding.device_set) == 2, leaf.sharding
    one, one_losses = results[False, False]
    for donate in (False, True):
        two, two_losses = results[donate, True]
        np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)  # and gradient norms
        assert int(one.step) == int(two.step) == 3
        for a, b in zip(comparable(one), comparable(two)):  # steps of ~0.02 to 0.07 (noam)
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def check_decoding():
    """Each of two devices decodes its share of the rows: greedy (tokens and logits), beam
    (all beams and their scores, of an ensemble) and scoring give the one-device outputs,
    for a batch the two do not divide;
    the compiled search runs half the rows per device and never communicates."""
    config = TransformerConfig.preset("tiny", d_model=16, num_heads=2, d_ff=32, max_len=16,
                                      num_encoder_layers=1, num_decoder_layers=1,
                                      src_vocab_size=20, tgt_vocab_size=20)
    model, other = (Transformer(config, rngs=nnx.Rngs(seed)) for seed in (0, 1))
    src = np.random.default_rng(0).integers(4, 20, (5, 6)).astype(np.int32)
    src[1, 3:] = src[4, 1:] = 0
    two = jax.devices()
    # Each row's logits differ from every other's: rows out of order would show.
    (a, a_logits), (b, b_logits) = (greedy_decode(model, src, max_len=10, return_logits=True,
                                                  devices=d) for d in (None, two))
    np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(b_logits, a_logits, rtol=1e-5, atol=1e-6)
    (a, a_scores), (b, b_scores) = (beam_search([model, other], src, beam_size=3, max_len=10,
                                                return_all_beams=True, devices=d)
                                    for d in (None, two))  # an ensemble: states as a tuple
    np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(b_scores, a_scores, rtol=1e-5)
    np.testing.assert_allclose(sequence_log_probs(model, src, a[:, 0], devices=two),
                               sequence_log_probs(model, src, a[:, 0]), rtol=1e-5)
    split = RowSplit.of(two)
    np.testing.assert_array_equal(split.pad(src), np.concatenate([src, src[:1]]))
    graphdefs, states = zip(*(split_model(m) for m in (model, other)))
    states, rows, limits = split.put(states, src, np.full(len(src), 10, np.int32))
    hlo = (_compiled_beam_search(graphdefs, 3, 10, split)  # the ensemble's search above
           .lower(states, rows, limits, jnp.float32(0.6), jnp.bool_(False))
           .compile().as_text())
    assert "s32[3,6]" in hlo  # 6 rows (5 and a copy of the first), 3 per device
    for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective
    assert decoding_devices(0).devices == tuple(two) and decoding_devices(1) is None


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
    run(os.path.join(root, "two"), n, devices=2)  # read by the parent, which has one device
    check_evaluation(straight, summary)  # after a one-device run: its programs are compiled
    bad = os.path.join(root, "bad")
    config = TrainingConfig(task="copy", steps=2, batch_size=7, devices=2, tensorboard=False)
    raises(lambda: train(MODEL, config, bad, progress=False), "batch_size=7", "devices=2")
    assert not os.path.exists(bad)


def check_evaluation(workdir, summary):
    """The two-device run's validation and test split their batches over both devices: the
    test report equals one device's scores of the same weights (loss and metric), and
    --evaluate decodes alike on one device and on two."""
    parts, state, model, config = latest_state(workdir)
    task = build_task(config)
    test = EvalSet(task.test, summary["eval_buckets"], model.max_len, batch_size=40)
    eval_step = make_eval_step(parts, label_smoothing=config.label_smoothing)
    one = evaluate_loss(eval_step, state.params, test)
    parallel = data_parallel(2, 40)
    both = evaluate_loss(eval_step, parallel.replicate(state.params), test, parallel)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(both[name], one[name], rtol=1e-5)
        np.testing.assert_allclose(summary["test"][name], one[name], rtol=1e-5)
    model = parts.model(init_model(model, seed=1)[1])  # 8 steps of training emit one token
    predictions = decode_examples(model, test, config)
    assert decode_examples(model, test, config, devices=parallel) == predictions
    assert len({tuple(p) for p in predictions}) > 5  # varied outputs: the order is checked
    metric = summary["metric_name"]
    runs = {devices: evaluate_run(workdir, config_overrides={"devices": devices})
            for devices in (1, 2)}
    for split in ("valid", "test"):
        assert runs[1][split][metric] == runs[2][split][metric], (split, runs)
    assert runs[1]["test"][metric] == summary["test"][metric], (runs, summary["test"])


if __name__ == "__main__":
    check_steps()
    check_decoding()
    check_train(sys.argv[1])
    print("ok")
