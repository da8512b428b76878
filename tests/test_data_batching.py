"""Bucketed batching: fixed shapes, teacher forcing, padding, coverage, shuffling, resume."""

import itertools

import numpy as np
import pytest

from flax_transformer.data import (
    BOS_ID,
    EOS_ID,
    Example,
    batch_stream,
    batches_per_epoch,
    bucket_lengths_for,
    fit_to_length,
    load_task,
    make_batches,
)

BUCKETS = (8, 16, 24)


@pytest.fixture(scope="module")
def examples():
    return load_task("reverse", seed=0, sizes=(300, 37, 0), max_len=20).train


def test_bucket_lengths_for():
    exs = [Example([4] * n + [EOS_ID], [5, EOS_ID]) for n in (1, 2, 3, 9, 10, 30)]  # 2..31
    assert bucket_lengths_for(exs, num_buckets=2) == (16, 32)  # median (higher) = 10
    assert bucket_lengths_for(exs, num_buckets=3, multiple=4) == (4, 12, 32)
    assert bucket_lengths_for(exs, num_buckets=2, max_len=20) == (16, 20)


def test_shapes_padding_and_teacher_forcing(examples):
    for batch in make_batches(examples, 16, bucket_lengths=BUCKETS):
        b, length = batch.src.shape
        assert b == 16 and length in BUCKETS
        assert batch.tgt_in.shape == batch.tgt_out.shape == (16, length)
        assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == np.int32
        for row, i in enumerate(batch.example_ids):
            if i < 0:
                assert not batch.src[row].any() and not batch.tgt_in[row].any()
                assert not batch.tgt_out[row].any()
                continue
            e = examples[i]
            assert batch.src[row, : len(e.src)].tolist() == e.src
            assert not batch.src[row, len(e.src) :].any()
            assert batch.tgt_out[row, : len(e.tgt)].tolist() == e.tgt
            assert batch.tgt_in[row, : len(e.tgt)].tolist() == [BOS_ID] + e.tgt[:-1]
            assert not batch.tgt_out[row, len(e.tgt) :].any()
            assert not batch.tgt_in[row, len(e.tgt) :].any()
            assert max(len(e.src), len(e.tgt)) > max([0] + [x for x in BUCKETS if x < length])


def test_eval_batches_cover_every_example_once(examples):
    ids = np.concatenate([b.example_ids for b in make_batches(examples, 16)])
    real = np.sort(ids[ids >= 0])
    assert real.tolist() == list(range(len(examples)))


def test_fill_and_drop_remainders(examples):
    fill = list(make_batches(examples, 16, shuffle=True, seed=1, remainder="fill"))
    ids = np.concatenate([b.example_ids for b in fill])
    assert (ids >= 0).all() and set(ids.tolist()) == set(range(len(examples)))
    drop = list(make_batches(examples, 16, shuffle=True, seed=1, remainder="drop"))
    assert all((b.example_ids >= 0).all() for b in drop) and len(drop) < len(fill)
    assert len(fill) == batches_per_epoch(examples, 16, "fill")
    assert len(drop) == batches_per_epoch(examples, 16, "drop")


def test_shuffle_is_deterministic_in_seed_and_epoch(examples):
    def order(**kw):
        return np.concatenate([b.example_ids for b in make_batches(examples, 16, **kw)])

    a = order(shuffle=True, seed=5, epoch=0)
    assert np.array_equal(a, order(shuffle=True, seed=5, epoch=0))
    assert not np.array_equal(a, order(shuffle=True, seed=5, epoch=1))
    assert not np.array_equal(a, order(shuffle=True, seed=6, epoch=0))
    assert sorted(a[a >= 0]) == sorted(order()[order() >= 0])


def test_too_long_raises_and_fit_to_length_truncates(examples):
    with pytest.raises(ValueError, match="fit_to_length"):
        list(make_batches(examples, 8, bucket_lengths=(8,)))
    cut, count = fit_to_length(examples, 8)
    assert count == sum(max(len(e.src), len(e.tgt)) > 8 for e in examples) > 0
    assert all(len(e.src) <= 8 and e.src[-1] == EOS_ID and e.tgt[-1] == EOS_ID for e in cut)
    assert len(list(make_batches(cut, 8, bucket_lengths=(8,)))) == -(-len(examples) // 8)


def test_batch_stream_resume_equals_uninterrupted(examples):
    per_epoch = batches_per_epoch(examples, 32, bucket_lengths=BUCKETS)
    total = 2 * per_epoch + 3
    full = list(itertools.islice(batch_stream(examples, 32, 7, bucket_lengths=BUCKETS), total))
    for start in (0, per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = batch_stream(examples, 32, 7, start_step=start, bucket_lengths=BUCKETS)
        for expected, got in zip(full[start:], resumed):
            for field in ("src", "tgt_in", "tgt_out", "example_ids"):
                assert np.array_equal(getattr(expected, field), getattr(got, field))
    epoch0 = {tuple(b.example_ids) for b in full[:per_epoch]}
    epoch1 = {tuple(b.example_ids) for b in full[per_epoch : 2 * per_epoch]}
    assert epoch0 != epoch1
