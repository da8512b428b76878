"""Right-to-left targets, scoring given targets, and reranking the beam with more models."""

import numpy as np
import pytest
from flax import nnx

from flax_transformer import EOS_ID, Transformer, TransformerConfig
from flax_transformer.data import Example, Vocab, load_task, reverse_targets, reverse_tokens
from flax_transformer.data.tasks import Task
from flax_transformer.data.vocab import strip_special
from flax_transformer.decoding import beam_search, gnmt_length_penalty, sequence_log_probs
from flax_transformer.training import TrainingConfig
from flax_transformer.training.evaluate import (
    EvalSet,
    decode_examples,
    decode_len,
    row_decode_lens,
)
from flax_transformer.training.loop import train
from flax_transformer.training.rescore import Scorer, check_same_tokenizers, rescored_predictions
from flax_transformer.training.runs import evaluate_run

CONFIG = TransformerConfig.preset("tiny", d_model=16, num_heads=2, d_ff=32,
                                  num_encoder_layers=1, num_decoder_layers=1, max_len=24)


def test_reverse_tokens_keeps_eos_and_padding_in_place():
    assert reverse_tokens([5, 6, 7, EOS_ID, 0, 0]) == [7, 6, 5, EOS_ID, 0, 0]
    assert reverse_tokens(np.array([5, 6, 7])) == [7, 6, 5]  # no eos: a truncated hypothesis
    assert reverse_tokens([EOS_ID, 0]) == [EOS_ID, 0]
    # cut off before its eos and padded (a row whose own budget ends before the batch's)
    assert reverse_tokens([5, 6, 7, 0, 0]) == [7, 6, 5, 0, 0]
    ids = [4, 9, 3, 8, EOS_ID, 0]
    assert reverse_tokens(reverse_tokens(ids)) == ids
    example = Example([4, 5, EOS_ID], [6, 7, 8, EOS_ID], refs=("x",))
    (flipped,) = reverse_targets([example])
    assert flipped == Example([4, 5, EOS_ID], [8, 7, 6, EOS_ID], refs=("x",))


def test_sequence_log_probs_equals_a_float64_reference_and_the_beam_scores():
    model = Transformer(CONFIG.replace(dropout_rate=0.1), rngs=nnx.Rngs(1))
    src = np.array([[5, 6, 7, 8, EOS_ID], [9, 4, EOS_ID, 0, 0]], np.int32)
    tokens, scores = beam_search(model, src, beam_size=3, max_len=8, length_penalty=0.0,
                                 return_all_beams=True)
    rows, k, length = tokens.shape
    hyps = tokens.reshape(rows * k, length)
    sources = np.repeat(src, k, axis=0)
    got = sequence_log_probs(model, sources, hyps)
    np.testing.assert_allclose(got, scores.reshape(-1), rtol=1e-5, atol=1e-5)

    tgt_in = np.concatenate([np.ones((rows * k, 1), np.int32), hyps[:, :-1]], axis=1)
    logits = np.asarray(nnx.view(model, deterministic=True)(sources, tgt_in), np.float64)
    logits[..., :2] = -np.inf  # pad and bos are never generated
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, hyps[..., None], -1)[..., 0]
    reference = np.where(hyps != 0, picked, 0.0).sum(-1)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    assert model.embed_dropout.deterministic is False  # the caller's model is not changed


def test_sequence_log_probs_rejects_bad_targets():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    src = np.array([[5, 6, EOS_ID]], np.int32)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sequence_log_probs(model, src, np.array([[5, EOS_ID], [6, EOS_ID]], np.int32))
    with pytest.raises(ValueError, match="vocabulary size"):
        sequence_log_probs(model, src, np.array([[500, EOS_ID]], np.int32))


def _eval_set(task, reverse_target=False):
    return EvalSet(task.valid, (8,), CONFIG.max_len, batch_size=16,
                   reverse_target=reverse_target)


def test_rescoring_picks_the_best_mean_score_of_all_models():
    task = load_task("copy", num_symbols=6, min_len=2, max_len=5, sizes=(50, 20, 0))
    sizes = dict(src_vocab_size=task.src_vocab_size, tgt_vocab_size=task.tgt_vocab_size)
    decoder, forward, backward = (Transformer(CONFIG.replace(**sizes), rngs=nnx.Rngs(seed))
                                  for seed in (0, 1, 2))
    # Untrained models often emit eos first; a zero eos embedding (logit 0) makes most of the
    # decoder's hypotheses long, so that their order matters below.
    table = decoder.target_embedding.embedding
    table[...] = table[...].at[EOS_ID].set(0.0)
    config = TrainingConfig(task="copy", decode="beam", beam_size=4, length_penalty=0.6)
    eval_set = _eval_set(task)

    # No other model: the beam's own choice.
    assert rescored_predictions(decoder, [], eval_set, config) == decode_examples(
        decoder, eval_set, config)

    got = rescored_predictions(decoder, [Scorer(forward), Scorer(backward, True)], eval_set,
                               config)
    expected = []
    for arrays, ids in eval_set.batches:
        src = arrays["src"]
        width = decode_len(CONFIG.max_len, src.shape[1])  # each row: its own source's budget
        tokens, _ = beam_search(decoder, src, beam_size=4, max_len=width, length_penalty=0.6,
                                return_all_beams=True,
                                row_max_len=row_decode_lens(CONFIG.max_len, src))
        for row, index in enumerate(ids):
            if index < 0:
                continue
            hyps = [list(h) + [0] * (width - len(h)) for h in tokens[row]]
            best, best_score = None, -np.inf
            for h in hyps:
                one = np.array([h], np.int32)
                back = np.array([reverse_tokens(h)], np.int32)
                total = sum(float(sequence_log_probs(m, src[row:row + 1], t)[0])
                            for m, t in ((decoder, one), (forward, one), (backward, back)))
                score = total / (3 * gnmt_length_penalty(np.count_nonzero(h), 0.6))
                if score > best_score:
                    best, best_score = h, score
            expected.append((index, best))
    assert [strip_special(p) for _, p in sorted(expected)] == [strip_special(p) for p in got]
    assert got != decode_examples(decoder, eval_set, config)  # the other models had a say

    # A decoding model that reads right to left: hypotheses come back in reading order.
    flipped = config.replace(reverse_target=True)
    backward_set = _eval_set(task, reverse_target=True)
    plain = [reverse_tokens(p) for p in decode_examples(decoder, eval_set, config)]
    assert sum(len(strip_special(p)) > 1 for p in plain) > 5
    assert decode_examples(decoder, backward_set, flipped) == plain
    assert rescored_predictions(decoder, [], backward_set, flipped) == plain
    with pytest.raises(ValueError, match="decode='beam'"):
        rescored_predictions(decoder, [], eval_set, config.replace(decode="greedy"))


def test_rescoring_models_must_share_the_tokenizers():
    vocab = Vocab(["a", "b"])
    task = Task("t", vocab, vocab, [], [], [])
    check_same_tokenizers(task, Task("t", vocab, Vocab(["a", "b"]), [], [], []), "run x")
    with pytest.raises(ValueError, match="run x: its tgt tokenizer differs"):
        check_same_tokenizers(task, Task("t", vocab, Vocab(["a", "c"]), [], [], []), "run x")


def test_right_to_left_run_learns_copy_and_evaluates_in_reading_order(tmp_path):
    model = TransformerConfig.preset("tiny", d_model=64, d_ff=128, max_len=24)
    config = TrainingConfig(task="copy", steps=400, batch_size=32, max_examples=1000,
                            num_buckets=1, log_every=100, eval_every=400,
                            checkpoint_every=400, lr_schedule="cosine", learning_rate=5e-3,
                            warmup_steps=50, eval_examples=100, eval_batch_size=100,
                            reverse_target=True)
    summary = train(model, config, tmp_path / "r2l", progress=False)
    # Scored in reading order (0.69 after 400 steps); if the outputs were left reversed, only
    # palindromes (~0) would count.
    assert summary["test"]["sequence_accuracy"] >= 0.5, summary["test"]
    results = evaluate_run(tmp_path / "r2l", splits=("test",))
    assert results["test"]["sequence_accuracy"] == summary["test"]["sequence_accuracy"]
    alone = evaluate_run(tmp_path / "r2l", config_overrides={"decode": "beam"})
    both = evaluate_run(tmp_path / "r2l", rescore_with=[tmp_path / "r2l"],
                        config_overrides={"decode": "beam"})
    assert both["valid"]["sequence_accuracy"] == alone["valid"]["sequence_accuracy"]
    assert both["test"]["sequence_accuracy"] == alone["test"]["sequence_accuracy"]

    # An ensemble of the run with itself decodes as the run alone, with or without rescoring.
    for rescore in ((), [tmp_path / "r2l"]):
        twice = evaluate_run(tmp_path / "r2l", ensemble_with=[tmp_path / "r2l"],
                             rescore_with=rescore, config_overrides={"decode": "beam"})
        for split in ("valid", "test"):
            assert twice[split]["sequence_accuracy"] == alone[split]["sequence_accuracy"]
    with pytest.raises(ValueError, match="--ensemble-with needs beam search"):
        evaluate_run(tmp_path / "r2l", ensemble_with=[tmp_path / "r2l"])
    # Models that read targets in opposite directions cannot be averaged token by token.
    train(model, config.replace(steps=2, reverse_target=False, tensorboard=False),
          tmp_path / "l2r", progress=False)
    with pytest.raises(ValueError, match="reads targets left to right .* --rescore-with"):
        evaluate_run(tmp_path / "r2l", ensemble_with=[tmp_path / "l2r"],
                     config_overrides={"decode": "beam"})


def test_decode_batch_bounds_an_ensemble_by_its_shortest_max_len():
    from flax_transformer.training.evaluate import decode_batch

    long = Transformer(CONFIG.replace(max_len=40), rngs=nnx.Rngs(1))
    short = Transformer(CONFIG, rngs=nnx.Rngs(2))  # max_len 24
    src = np.array([[5, 6, 7, 8] * 4 + [EOS_ID]], np.int32)  # 17 tokens: 1.5x + 10 > 24
    config = TrainingConfig(task="copy", decode="beam", beam_size=2)
    tokens = decode_batch([long, short], src, config)
    assert tokens.shape[1] <= 24
    with pytest.raises(ValueError, match="an ensemble decodes with beam search"):
        decode_batch([long, short], src, config.replace(decode="greedy"))


def test_partners_must_have_learned_the_same_task(tmp_path):
    model = TransformerConfig.preset("tiny", max_len=24)
    for task in ("copy", "reverse"):  # the same vocabulary, different tasks
        config = TrainingConfig(task=task, steps=1, batch_size=8, max_examples=16,
                                num_buckets=1, eval_examples=4, decode="beam", beam_size=2)
        train(model, config, tmp_path / task, progress=False)
    for option in ("ensemble_with", "rescore_with"):
        with pytest.raises(ValueError, match="learned task 'reverse', the decoding run 'copy'"):
            evaluate_run(tmp_path / "copy", **{option: [tmp_path / "reverse"]})
