"""Synthetic copy/reverse tasks: determinism, shapes of examples, sequence accuracy."""

import pytest

from flax_transformer.data import EOS_ID, load_task


def test_copy_and_reverse_targets():
    copy = load_task("copy", seed=3, sizes=(50, 10, 10), min_len=2, max_len=6)
    reverse = load_task("reverse", seed=3, sizes=(50, 10, 10), min_len=2, max_len=6)
    assert (len(copy.train), len(copy.valid), len(copy.test)) == (50, 10, 10)
    for c, r in zip(copy.train, reverse.train):
        assert c.src == r.src  # same seed, same sources
        assert c.src[-1] == c.tgt[-1] == EOS_ID
        assert 2 <= len(c.src) - 1 <= 6
        assert c.tgt == c.src
        assert r.tgt[:-1] == r.src[:-1][::-1]
    assert copy.src_vocab is copy.tgt_vocab and len(copy.src_vocab) == 24


def test_deterministic_in_seed_and_split_streams_independent():
    a = load_task("copy", seed=1, sizes=(100, 20, 20))
    assert a.train == load_task("copy", seed=1, sizes=(100, 20, 20)).train
    assert a.train != load_task("copy", seed=2, sizes=(100, 20, 20)).train
    assert a.valid == load_task("copy", seed=1, sizes=(7, 20, 20)).valid


def test_text_interface_and_score():
    task = load_task("reverse", max_examples=5)
    ids = task.encode_source("a b c")
    assert ids[-1] == EOS_ID and task.decode_source(ids) == "a b c"
    assert task.decode_target(task.encode_target("c b a") + [7, 7]) == "c b a"
    predictions = [e.tgt + [0, 0] for e in task.valid]
    assert task.score(predictions, task.valid)["sequence_accuracy"] == 1.0
    predictions[0] = [EOS_ID]
    assert task.score(predictions, task.valid)["sequence_accuracy"] == pytest.approx(4 / 5)


def test_rejects_files_and_bad_lengths(tmp_path):
    with pytest.raises(ValueError, match="train_file"):
        load_task("copy", train_file=tmp_path / "x.tsv")
    with pytest.raises(ValueError, match="min_len"):
        load_task("copy", min_len=5, max_len=2)


def test_a_saved_task_file_never_imports_a_foreign_module(tmp_path):
    import json

    from flax_transformer.data import restore_task

    task = load_task("copy", max_examples=8)
    task.save_tokenizers(tmp_path)
    meta_path = tmp_path / "task.json"
    meta = json.loads(meta_path.read_text())
    meta["class"] = "antigravity:Task"  # importing it would open a web browser
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not from flax_transformer or a module"):
        restore_task(tmp_path)
    meta_path.write_text("{bad")
    with pytest.raises(ValueError, match=r"task.json: not a valid task file"):
        restore_task(tmp_path)
    meta_path.write_text("{}")
    with pytest.raises(ValueError, match=r"missing class, name"):
        restore_task(tmp_path)
