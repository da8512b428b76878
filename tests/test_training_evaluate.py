"""Evaluation shapes: every split of a run is padded to the same few lengths."""

import numpy as np
from flax import nnx

from flax_transformer import Transformer, TransformerConfig
from flax_transformer.data import Example, load_task
from flax_transformer.training import TrainingConfig, loop
from flax_transformer.training import evaluate as evaluate_module
from flax_transformer.training.evaluate import EvalSet, eval_bucket_lengths, predict_texts


def _examples(lengths):
    return [Example(src=[5] * n, tgt=[6] * n) for n in lengths]


def test_eval_bucket_lengths_cover_all_splits_and_pad_them_least():
    valid, test = _examples([2, 2, 3, 9]), _examples([2, 3, 3, 4, 30])
    # Two lengths for both splits together: the longest, 30, and then 4, whose padded size
    # 7*4 + 2*30 = 88 beats 3 (6*3 + 3*30 = 108), 9 (8*9 + 30 = 102) and 2 (186).
    lengths = eval_bucket_lengths([valid, test], 2, max_len=64)
    assert lengths == (4, 30)
    assert lengths == eval_bucket_lengths([valid + test], 2, max_len=64)
    # Examples longer than max_len are cut to it, so max_len is the last length.
    assert eval_bucket_lengths([valid, test], 2, max_len=16)[-1] == 16
    assert eval_bucket_lengths([valid, test], 1, max_len=64) == (30,)
    for split in (valid, test):
        padded = EvalSet(split, lengths, 64, batch_size=4)
        assert {arrays["src"].shape[1] for arrays, _ in padded.batches} <= set(lengths)


def test_a_run_evaluates_every_split_in_eval_buckets_shapes(tmp_path, monkeypatch):
    """The loss batches and decoded batches of valid (both sets) and test share at most
    `eval_buckets` lengths, however many buckets training uses: each is a compilation."""
    shapes = []
    evaluate = loop.evaluate

    def recording(model, eval_step, params, loss_set, decode_set, task, config, parallel):
        for eval_set in (loss_set, decode_set):
            shapes.extend(arrays["src"].shape for arrays, _ in eval_set.batches)
        return evaluate(model, eval_step, params, loss_set, decode_set, task, config, parallel)

    monkeypatch.setattr(loop, "evaluate", recording)
    model = TransformerConfig.preset("tiny", max_len=32)
    config = TrainingConfig(task="copy", steps=1, batch_size=8, max_examples=60,
                            num_buckets=4, eval_buckets=2, eval_every=1, eval_examples=10,
                            eval_batch_size=16, log_every=1, tensorboard=False)
    summary = loop.train(model, config, tmp_path / "run", progress=False)
    assert len(summary["buckets"]) == 4
    assert {shape[1] for shape in shapes} == set(summary["eval_buckets"])
    assert len(summary["eval_buckets"]) == 2
    assert {shape[0] for shape in shapes} == {16}


def test_eval_batches_are_never_padded_past_the_largest_split():
    from flax_transformer.training.evaluate import eval_batch_size

    three = [Example([5, 6, 2], [7, 2], ("x",)) for _ in range(3)]
    assert eval_batch_size(1_000_000, [three, three[:2]]) == 3
    assert eval_batch_size(2, [three]) == 2
    # Several devices take equal shares: the size is rounded up to a multiple of their count.
    assert eval_batch_size(1_000_000, [three], devices=2) == 4
    assert eval_batch_size(5, [three * 3], devices=4) == 8
    assert eval_batch_size(8, [three * 3], devices=4) == 8
    size = eval_batch_size(10**6, [three])
    padded = EvalSet(three, eval_bucket_lengths([three], 1, 64), 64, size)
    assert [arrays["src"].shape[0] for arrays, _ in padded.batches] == [3]


def test_a_prediction_does_not_depend_on_the_other_sources_of_its_batch():
    """Each row's budget comes from its own length, not the batch's padded width: a short
    source that never says eos (a random model) gets the same output alone or beside a long
    one, greedy and beam, and with `rescored_predictions`' beam too."""
    import numpy as np
    from flax import nnx

    from flax_transformer import Transformer
    from flax_transformer.training.evaluate import decode_batch, decode_len

    model = Transformer(TransformerConfig.preset(
        "tiny", d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
        max_len=48), rngs=nnx.Rngs(0))
    short = np.array([[5, 6, 2] + [0] * 13])
    batch = np.concatenate([short, np.array([[7] * 15 + [2]])])
    for decode in ("greedy", "beam"):
        config = TrainingConfig(decode=decode, beam_size=2)
        alone, beside = decode_batch(model, short, config), decode_batch(model, batch, config)
        assert (alone[0] != 0).sum() == decode_len(48, 3)  # no eos: it used its whole budget
        np.testing.assert_array_equal(beside[0, :alone.shape[1]], alone[0])
        assert np.all(beside[0, alone.shape[1]:] == 0)


def test_predict_texts_decodes_a_long_list_in_few_shapes_each_output_its_own(monkeypatch,
                                                                               capsys):
    """--predict of many texts: batches of eval_batch_size rows padded to eval_buckets
    lengths (bounded memory, few compilations), and every output lands on its own text. A
    stand-in decoder copies each source, so the outputs say which text each row was."""
    task = load_task("copy", max_examples=16)
    model = Transformer(TransformerConfig.preset("tiny", max_len=32,
                                                 src_vocab_size=task.src_vocab_size,
                                                 tgt_vocab_size=task.tgt_vocab_size),
                        rngs=nnx.Rngs(0))
    shapes = []

    def copy_decoder(model, src, config, max_len=None, devices=None):
        shapes.append(src.shape)
        return np.concatenate([src, np.zeros_like(src)], axis=1)  # eos, then padding

    monkeypatch.setattr(evaluate_module, "decode_batch", copy_decoder)
    symbols = "a b c d e f g h".split()
    texts = [" ".join(symbols[i % 8:][:1 + i % 5] + symbols[:i // 8]) for i in range(11)]
    assert len(set(texts)) == 11 and len({len(text) for text in texts}) > 2
    config = TrainingConfig(task="copy", eval_batch_size=3, eval_buckets=2)
    assert predict_texts(model, task, texts, config) == texts
    assert {rows for rows, _ in shapes} == {3} and len({width for _, width in shapes}) <= 2
    assert len(shapes) <= 5  # 11 texts in batches of 3, split over at most 2 lengths
    # Inputs with unknown tokens are named one by one up to a few, then counted.
    capsys.readouterr()
    assert len(predict_texts(model, task, ["zzz a"] * 8, config)) == 8
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings[:5] == ["warning: input 'zzz a' has 1 token(s) the model never saw in "
                            "training; they are read as unknown"] * 5
    assert warnings[5:] == ["warning: 3 more inputs have tokens the model never saw in "
                            "training"]
    shapes.clear()  # texts that fit one batch: one length, so one compiled search
    assert predict_texts(model, task, texts[:3], config) == texts[:3]
    assert shapes == [(3, max(len(text.split()) for text in texts[:3]) + 1)]
