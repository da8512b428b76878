"""Evaluation: loss and token accuracy over a split, decoding for the task metric, prediction.

A split is prepared once (`EvalSet`): its examples are padded to one of a few lengths, shared
by all the run's evaluation splits (`eval_bucket_lengths`: the `TrainingConfig.eval_buckets`
lengths that pad valid and test together least), and every batch to `eval_batch_size` rows,
so the loss step and the decoding loop see a few fixed shapes. Each shape compiles once per
run (a beam search ~3 s, a loss step ~2 s on a 2-core CPU), more than a split decoded a few
times gains from less padding: hence the default of 2 lengths.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ..data import (
    EOS_ID,
    UNK_ID,
    Example,
    Task,
    fit_to_length,
    make_batches,
    reverse_targets,
    reverse_tokens,
)
from .buckets import optimal_bucket_lengths
from .config import TrainingConfig
from .loss import summarize
from .parallel import DataParallel
from .step import batch_arrays


def eval_batch_size(requested: int, splits: Sequence[Sequence[Example]],
                    devices: int = 1) -> int:
    """`requested`, capped at the largest split's size (batches never pad far past the data,
    and every split keeps one batch shape), then rounded up to a multiple of `devices` (each
    device takes an equal share of the rows)."""
    size = min(requested, max((len(split) for split in splits), default=requested) or 1)
    return -(-size // devices) * devices


def eval_bucket_lengths(splits: Sequence[Sequence[Example]], num_buckets: int,
                        max_len: int) -> tuple[int, ...]:
    """The at most `num_buckets` lengths that pad the examples of all `splits` together (cut
    to max_len) least: shared by a run's splits, so their shapes compile once."""
    fitted = [e for split in splits for e in fit_to_length(split, max_len)[0]]
    return optimal_bucket_lengths(fitted, num_buckets, max_len)


def eval_buckets(examples: Sequence[Example], bucket_lengths: Sequence[int],
                 max_len: int) -> tuple[list[Example], tuple[int, ...], int]:
    """(examples cut to max_len, bucket lengths that hold them, number cut): `bucket_lengths`,
    plus `max_len` when some example is longer than the largest of them."""
    fitted, cut = fit_to_length(examples, max_len)
    longest = max((max(len(e.src), len(e.tgt)) for e in fitted), default=0)
    buckets = tuple(bucket_lengths)
    if longest > buckets[-1]:
        buckets = buckets + (max_len,)
    return fitted, buckets, cut


def cut_warning(cuts: dict[str, int], max_len: int) -> str | None:
    """A warning line for evaluation splits with examples longer than max_len ({split: number
    cut}), None if none is: a cut source or target is scored against its whole reference."""
    parts = [f"{count:,} {split}" for split, count in cuts.items() if count]
    if not parts:
        return None
    return (f"warning: {' / '.join(parts)} examples are longer than max_len={max_len} and are "
            "cut to it, so their outputs are scored against the whole references (raise "
            "--max-len to score them whole)")


class EvalSet:
    """One split prepared once: fixed-shape loss batches and decoding batches, padded to
    `bucket_lengths` (see `eval_bucket_lengths`) and `batch_size` rows.

    `reverse_target`: the batches hold the targets right to left (for a model trained that
    way, `TrainingConfig.reverse_target`); `examples` keep them in order for scoring."""

    def __init__(self, examples: Sequence[Example], bucket_lengths: Sequence[int],
                 max_len: int, batch_size: int, reverse_target: bool = False):
        if not examples:
            raise ValueError("an evaluation split is empty; give it some examples")
        self.examples = list(examples)
        fitted, self.buckets, self.cut = eval_buckets(self.examples, bucket_lengths, max_len)
        if reverse_target:
            fitted = reverse_targets(fitted)
        self.batches = [
            (batch_arrays(b), b.example_ids)
            for b in make_batches(fitted, batch_size, bucket_lengths=self.buckets,
                                  remainder="pad")
        ]

    def __len__(self) -> int:
        return len(self.examples)


def evaluate_loss(eval_step: Callable, params: Any, eval_set: EvalSet,
                  parallel: DataParallel | None = None) -> dict[str, float]:
    """Label-smoothed loss, plain NLL and token accuracy over the whole split; with `parallel`
    each batch is split by rows over its devices (`params` replicated there, the batch size
    a multiple of their count)."""
    place = (lambda arrays: arrays) if parallel is None else parallel.shard
    pending = [eval_step(params, place(arrays)) for arrays, _ in eval_set.batches]
    host = jax.device_get(pending)
    totals = {k: sum(float(h[k]) for h in host) for k in host[0]}
    return summarize(totals)


def decode_len(model_max_len: int, src_len: int) -> int:
    """Tokens to generate for a source of `src_len` tokens: 1.5x + 10, at most max_len."""
    return min(model_max_len, int(1.5 * src_len) + 10)


def row_decode_lens(model_max_len: int, src: np.ndarray) -> np.ndarray:
    """`decode_len` of each row of `src` [B, S] from its own length (its non-pad tokens), so
    that an output never depends on the other sources of its batch: [B] int32."""
    lengths = (np.asarray(src) != 0).sum(axis=1)
    return np.array([decode_len(model_max_len, int(n)) for n in lengths], np.int32)


def decode_batch(model, src: np.ndarray, config: TrainingConfig,
                 max_len: int | None = None, devices=None) -> np.ndarray:
    """Greedy or beam decoding of one source batch [B, S] -> tokens [B, L] (eos, then pad).
    `model`: a Transformer, or a list of them decoded as an ensemble (beam search only; the
    smallest max_len among them bounds the output). `devices`: None, or the devices (a list,
    or a `RowSplit`) that each decode a share of the rows."""
    from ..decoding import beam_search, ensemble_members, greedy_decode

    members = ensemble_members(model)
    rows = None
    if max_len is None:  # compiled for the padded width, each row stopped at its own budget
        limit = min(m.config.max_len for m in members)
        max_len, rows = decode_len(limit, src.shape[1]), row_decode_lens(limit, src)
    if config.decode == "beam":
        tokens, _ = beam_search(model, src, beam_size=config.beam_size, max_len=max_len,
                                length_penalty=config.length_penalty, devices=devices,
                                row_max_len=rows)
        return np.asarray(tokens)
    if len(members) > 1:
        raise ValueError("an ensemble decodes with beam search: use decode='beam' "
                         "(--decode beam)")
    return np.asarray(greedy_decode(members[0], src, max_len=max_len, devices=devices,
                                    row_max_len=rows))


def decode_examples(model, eval_set: EvalSet, config: TrainingConfig,
                    devices=None) -> list[list[int]]:
    """Predictions (token ids, in reading order) for every example of `eval_set`, in its
    order; `devices` as for `decode_batch`."""
    predictions: list[list[int]] = [[] for _ in range(len(eval_set))]
    for arrays, ids in eval_set.batches:
        tokens = decode_batch(model, arrays["src"], config, devices=devices)
        for row, index in enumerate(ids):
            if index >= 0:
                row_ids = tokens[row].tolist()
                predictions[index] = reverse_tokens(row_ids) if config.reverse_target else row_ids
    return predictions


def evaluate(model, eval_step, params, loss_set: EvalSet | None, decode_set: EvalSet,
             task: Task, config: TrainingConfig,
             parallel: DataParallel | None = None) -> dict[str, float]:
    """Loss/accuracy over `loss_set` (skipped if None), the task metric on `decode_set`
    (greedy or beam, per `config.decode`), and how long decoding took. With `parallel`
    (`params` replicated on its devices) every batch is split over the devices."""
    results = {} if loss_set is None else evaluate_loss(eval_step, params, loss_set, parallel)
    start = time.perf_counter()
    predictions = decode_examples(model, decode_set, config, devices=parallel)
    scores = task.score(predictions, decode_set.examples)
    results.update({k: float(v) for k, v in scores.items()})
    results["decode_seconds"] = time.perf_counter() - start
    return results


MAX_UNKNOWN_WARNINGS = 5  # inputs named one by one; the rest are counted


def predict_texts(model, task: Task, texts: Sequence[str], config: TrainingConfig,
                  devices=None) -> list[str]:
    """Outputs for raw input texts (e.g. words -> pronunciations), in the order given.
    `model`: a Transformer or a list of them (an ensemble, beam search only); `devices` as
    for `decode_batch`. The texts are decoded as an evaluation split is: in batches of at
    most `config.eval_batch_size` rows padded to `config.eval_buckets` lengths (one length
    when they fit one batch), so a long list costs a few compiled shapes and bounded memory,
    and each output is its text's alone (its decoding budget comes from its own length)."""
    if not texts:
        raise ValueError("--predict needs at least one input text")
    from ..decoding import ensemble_members

    limit = ensemble_members(model)[0].config.max_len
    examples, with_unknown = [], 0
    for text in texts:
        if not text.strip():
            raise ValueError(f"input {text!r} is empty; give some text to --predict")
        ids = task.encode_source(text)
        unknown = sum(1 for token in ids if token == UNK_ID)
        with_unknown += unknown > 0
        if unknown and with_unknown <= MAX_UNKNOWN_WARNINGS:
            print(f"warning: input {text[:40]!r} has {unknown} token(s) the model never saw "
                  "in training; they are read as unknown", file=sys.stderr)
        if len(ids) > limit:
            raise ValueError(
                f"input {text[:40]!r} is {len(ids)} tokens long, more than the model's "
                f"max_len={limit}; shorten it"
            )
        examples.append(Example(src=ids, tgt=[EOS_ID]))  # no target: its shortest stand-in
    if with_unknown > MAX_UNKNOWN_WARNINGS:
        print(f"warning: {with_unknown - MAX_UNKNOWN_WARNINGS} more inputs have tokens the "
              "model never saw in training", file=sys.stderr)
    batch_size = eval_batch_size(config.eval_batch_size, [examples])
    # A second length costs a second compiled search, worth it only over several batches.
    batches = -(-len(examples) // batch_size)
    lengths = eval_bucket_lengths([examples], min(config.eval_buckets, batches), limit)
    inputs = EvalSet(examples, lengths, limit, batch_size)
    return [task.decode_target(row) for row in decode_examples(model, inputs, config, devices)]
