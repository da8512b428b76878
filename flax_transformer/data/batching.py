"""Length-bucketed, fixed-shape batches of encoded examples (numpy only).

Bucket policy: an example of length ``max(len(src), len(tgt))`` goes to the smallest bucket
length that holds it, and its src, tgt_in and tgt_out are all padded with 0 to that length, so a
jitted step compiles once per bucket. An example longer than the largest bucket raises
ValueError; truncate beforehand with ``fit_to_length`` (which reports how many it cut).

Every batch has exactly ``batch_size`` rows. What happens to a bucket's last partial batch is
``remainder``: 'pad' (evaluation: filler rows are all pad, ``example_ids`` -1, so a loss masked
on ``tgt_out != 0`` ignores them and every example appears exactly once), 'fill' (training:
the batch is completed with the bucket's first examples of the epoch's order) or 'drop'.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from flax_transformer.data.tasks import Example
from flax_transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID

REMAINDERS = ("pad", "fill", "drop")


@dataclass(frozen=True)
class Batch:
    """``src``, ``tgt_in``, ``tgt_out``: int32 [B, L]; ``tgt_in`` = [bos] + tgt[:-1] (teacher
    forcing), ``tgt_out`` = tgt; ``example_ids``: int64 [B], index of each row's example or -1."""

    src: np.ndarray
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    example_ids: np.ndarray

    @property
    def num_examples(self) -> int:
        return int((self.example_ids >= 0).sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.tgt_out != 0).sum())


def example_length(example: Example) -> int:
    return max(len(example.src), len(example.tgt))


def bucket_lengths_for(
    examples: Sequence[Example],
    num_buckets: int = 4,
    multiple: int = 8,
    max_len: int | None = None,
) -> tuple[int, ...]:
    """Bucket lengths at the 1/n, 2/n, ..., 1 quantiles of the example lengths, rounded up to
    a multiple of ``multiple`` (duplicates merged). The last covers the longest example, or is
    ``max_len`` if that is smaller."""
    if not examples:
        raise ValueError("cannot choose bucket lengths for zero examples")
    if num_buckets < 1 or multiple < 1:
        raise ValueError(f"need num_buckets >= 1 and multiple >= 1: {num_buckets}, {multiple}")
    lengths = np.array([example_length(e) for e in examples])
    quantiles = np.quantile(lengths, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
    buckets = {int(math.ceil(q / multiple) * multiple) for q in quantiles}
    if max_len is not None:
        buckets = {min(b, max_len) for b in buckets}
    return tuple(sorted(buckets))


def fit_to_length(examples: Sequence[Example], max_len: int) -> tuple[list[Example], int]:
    """Examples cut to at most ``max_len`` tokens per side (the last kept token becomes eos),
    and how many were cut."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out, cut = [], 0
    for e in examples:
        if example_length(e) <= max_len:
            out.append(e)
            continue
        cut += 1
        src = e.src if len(e.src) <= max_len else e.src[: max_len - 1] + [EOS_ID]
        tgt = e.tgt if len(e.tgt) <= max_len else e.tgt[: max_len - 1] + [EOS_ID]
        out.append(Example(src, tgt, e.refs))
    return out, cut


def reverse_tokens(ids: Sequence[int]) -> list[int]:
    """The tokens before the first eos (or pad, in an output cut off before its eos) in
    reverse order, then the rest as it was: ``[a, b, c, eos, pad]`` -> ``[c, b, a, eos, pad]``,
    ``[a, b, pad]`` -> ``[b, a, pad]``. Its own inverse (right-to-left targets)."""
    ids = [int(i) for i in ids]
    end = next((i for i, token in enumerate(ids) if token in (EOS_ID, PAD_ID)), len(ids))
    return ids[:end][::-1] + ids[end:]


def reverse_targets(examples: Sequence[Example]) -> list[Example]:
    """Examples whose targets read right to left (``refs`` unchanged: they score the output
    once it is put back in order with ``reverse_tokens``)."""
    return [Example(e.src, reverse_tokens(e.tgt), e.refs) for e in examples]


class _Buckets:
    """Examples packed into one padded array triple per bucket (plus an all-pad row at -1)."""

    def __init__(self, examples: Sequence[Example], bucket_lengths: Sequence[int] | None):
        if not examples:
            raise ValueError("no examples to batch")
        lengths = (
            tuple(bucket_lengths) if bucket_lengths is not None else bucket_lengths_for(examples)
        )
        if not lengths or list(lengths) != sorted(set(lengths)) or lengths[0] < 1:
            raise ValueError(f"bucket_lengths must be increasing positive ints, got {lengths}")
        sizes = np.array([example_length(e) for e in examples])
        which = np.searchsorted(np.array(lengths), sizes, side="left")
        too_long = np.flatnonzero(which == len(lengths))
        if too_long.size:
            raise ValueError(
                f"{too_long.size} example(s) longer than the largest bucket {lengths[-1]} "
                f"(e.g. example {too_long[0]}, length {sizes[too_long[0]]}); "
                "truncate them with fit_to_length() or add a larger bucket"
            )
        self.lengths = lengths
        self.members = [np.flatnonzero(which == b) for b in range(len(lengths))]
        self.arrays = [self._pack(examples, m, n) for m, n in zip(self.members, lengths)]

    @staticmethod
    def _pack(examples: Sequence[Example], members: np.ndarray, length: int) -> np.ndarray:
        packed = np.zeros((3, len(members) + 1, length), np.int32)  # src, tgt_in, tgt_out
        for row, i in enumerate(members):
            e = examples[i]
            packed[0, row, : len(e.src)] = e.src
            packed[1, row, 0] = BOS_ID
            packed[1, row, 1 : len(e.tgt)] = e.tgt[:-1]
            packed[2, row, : len(e.tgt)] = e.tgt
        return packed

    def plan(
        self, batch_size: int, remainder: str, rng: np.random.Generator | None
    ) -> list[tuple[int, np.ndarray]]:
        """(bucket, row positions) per batch; position -1 is the all-pad row."""
        batches = []
        for b, members in enumerate(self.members):
            order = rng.permutation(len(members)) if rng is not None else np.arange(len(members))
            if remainder == "drop":
                order = order[: len(order) // batch_size * batch_size]
            elif len(order):
                total = math.ceil(len(order) / batch_size) * batch_size
                if remainder == "fill":  # wrap around to the bucket's first examples
                    filler = np.resize(order, total)[len(order) :]
                else:  # "pad": the all-pad row
                    filler = np.full(total - len(order), -1)
                order = np.concatenate([order, filler])
            batches += [(b, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batch(self, bucket: int, positions: np.ndarray) -> Batch:
        packed = self.arrays[bucket][:, positions]
        ids = np.where(positions >= 0, self.members[bucket][positions], -1).astype(np.int64)
        return Batch(packed[0], packed[1], packed[2], ids)


def _check(batch_size: int, remainder: str) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")


def make_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    bucket_lengths: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    remainder: str = "pad",
) -> Iterator[Batch]:
    """One pass over ``examples``. Unshuffled: buckets in increasing length, examples in order.
    Shuffled: the order within buckets and of batches is a function of (seed, epoch) only.
    ``bucket_lengths=None`` picks them with ``bucket_lengths_for(examples)``."""
    _check(batch_size, remainder)
    buckets = _Buckets(examples, bucket_lengths)
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    for bucket, positions in buckets.plan(batch_size, remainder, rng):
        yield buckets.batch(bucket, positions)


def batch_stream(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    start_step: int = 0,
    *,
    bucket_lengths: Sequence[int] | None = None,
    remainder: str = "fill",
) -> Iterator[Batch]:
    """Endless shuffled training batches, epoch after epoch. Batch ``k`` is the same whether the
    stream started at 0 or at ``start_step <= k`` (bitwise resume from a step counter)."""
    _check(batch_size, remainder)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    buckets = _Buckets(examples, bucket_lengths)
    epoch, skip = divmod(start_step, _count(buckets, batch_size, remainder))
    while True:
        plan = buckets.plan(batch_size, remainder, np.random.default_rng([seed, epoch]))
        for bucket, positions in plan[skip:]:
            yield buckets.batch(bucket, positions)
        epoch, skip = epoch + 1, 0


def batches_per_epoch(
    examples: Sequence[Example],
    batch_size: int,
    remainder: str = "fill",
    *,
    bucket_lengths: Sequence[int] | None = None,
) -> int:
    """Number of batches ``make_batches``/``batch_stream`` give per epoch."""
    _check(batch_size, remainder)
    return _count(_Buckets(examples, bucket_lengths), batch_size, remainder)


def _count(buckets: _Buckets, batch_size: int, remainder: str) -> int:
    rounding = math.floor if remainder == "drop" else math.ceil
    count = sum(rounding(len(m) / batch_size) for m in buckets.members)
    if count == 0:
        raise ValueError(f"no full batch of {batch_size}: every bucket is smaller (remainder=drop)")
    return count
