"""Reranking the beam's n-best list with more models.

Each hypothesis of the beam scores the mean of the log-probabilities that the decoding model
and the rescoring models give it, divided by the GNMT length penalty of the beam
(`length_penalty`); the best one wins. With no rescoring model this is the beam's own choice.

The natural partner is a model of the same task trained right to left (`reverse_target`): it
reads each hypothesis from the other end, so it can tell which of the beam's guesses went
wrong early. Any run of the same task with the same tokenizers may rescore (a second seed
makes a plain ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import PAD_ID, Task, reverse_tokens
from ..decoding import beam_search, ensemble_members, gnmt_length_penalty, sequence_log_probs
from ..decoding.common import trim
from .config import TrainingConfig
from .evaluate import EvalSet, decode_len, row_decode_lens


@dataclass(frozen=True)
class Scorer:
    """A model that scores hypotheses; `reverse_target`: it reads targets right to left."""

    model: Any
    reverse_target: bool = False


def check_same_tokenizers(task: Task, other: Task, where: str) -> None:
    """Raises ValueError unless `other` encodes sources and targets exactly as `task` does."""
    for side in ("src_vocab", "tgt_vocab"):
        if getattr(task, side) != getattr(other, side):
            raise ValueError(
                f"{where}: its {side.split('_')[0]} tokenizer differs from the decoding run's; "
                "models combined must be trained on the same task and data (same tokenizers)"
            )


def _reversed_rows(tokens: np.ndarray) -> np.ndarray:
    return np.array([reverse_tokens(row) for row in tokens], np.int32).reshape(tokens.shape)


def rescored_predictions(model, scorers: Sequence[Scorer], eval_set: EvalSet,
                         config: TrainingConfig, devices=None) -> list[list[int]]:
    """The best hypothesis (token ids in reading order) for every example of `eval_set`:
    `model`'s beam (`config.beam_size`, `config.length_penalty`; `config.reverse_target` says
    how `model` reads targets) reranked by `model` and `scorers` together. `model` may be a
    list of models (an ensemble): its beam and its log-probabilities count as one scorer's.
    `devices`: None, or the devices (a list, or a `RowSplit`) that each decode and score a
    share of the rows."""
    if config.decode != "beam":
        raise ValueError("rescoring reranks the beam's hypotheses: use decode='beam' "
                         "(--decode beam)")
    alpha = config.length_penalty
    predictions: list[list[int]] = [[] for _ in range(len(eval_set))]
    for arrays, ids in eval_set.batches:
        src = arrays["src"]
        limit = min(m.config.max_len for m in ensemble_members(model))
        width = decode_len(limit, src.shape[1])
        tokens, beam_scores = beam_search(model, src, beam_size=config.beam_size,
                                          max_len=width, length_penalty=alpha,
                                          return_all_beams=True, devices=devices,
                                          row_max_len=row_decode_lens(limit, src))
        rows, k, length = tokens.shape
        hyps = np.zeros((rows * k, width), np.int32)  # fixed width: one compile per bucket
        hyps[:, :length] = tokens.reshape(rows * k, length)
        if config.reverse_target:
            hyps = _reversed_rows(hyps)  # reading order
        sources = np.repeat(src, k, axis=0)
        penalty = gnmt_length_penalty((hyps != PAD_ID).sum(axis=1), alpha)
        # The decoding model's log-probabilities are the beam's scores times their penalty
        # (-inf for empty beam slots, which keeps them out); the partners score each hypothesis.
        total = beam_scores.reshape(-1).astype(np.float64) * penalty
        for scorer in scorers:
            targets = _reversed_rows(hyps) if scorer.reverse_target else hyps
            total += sequence_log_probs(scorer.model, sources, targets, devices=devices)
        combined = total / ((1 + len(scorers)) * penalty)
        best = combined.reshape(rows, k).argmax(axis=1)
        chosen = trim(hyps.reshape(rows, k, width)[np.arange(rows), best])
        for row, index in enumerate(ids):
            if index >= 0:
                predictions[index] = chosen[row].tolist()
    return predictions
