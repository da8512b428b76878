"""Vocab: special ids, deterministic build order, encode/decode, JSON and file round trips."""

import pytest

from flax_transformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab


def test_special_ids_are_fixed():
    vocab = Vocab(["x"])
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert vocab.symbols[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.id_of("x") == 4
    assert len(vocab) == 5


def test_build_orders_by_frequency_then_symbol():
    vocab = Vocab.build([["b", "a", "c"], ["c", "b"], ["d", "c"]])
    assert vocab.symbols[4:] == ["c", "b", "a", "d"]
    assert Vocab.build([["b", "a"], ["a"]], min_count=2).symbols[4:] == ["a"]


def test_build_ignores_input_order():
    a = Vocab.build([["x", "y"], ["z", "y"]])
    b = Vocab.build([["y", "z"], ["y", "x"]])
    assert a == b


def test_encode_decode_round_trip():
    vocab = Vocab.build([list("hello")])
    ids = vocab.encode(list("hole"), add_eos=True)
    assert ids[-1] == EOS_ID
    assert vocab.decode(ids) == list("hole")
    assert vocab.encode(["?"]) == [UNK_ID]


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    vocab = Vocab(["a", "b"])
    assert vocab.decode([BOS_ID, 4, PAD_ID, 5, EOS_ID, 4, 4]) == ["a", "b"]
    assert vocab.decode([4, 99]) == ["a", "<unk>"]


def test_rejects_duplicates_and_specials():
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="reserved"):
        Vocab(["<eos>"])


def test_json_and_file_round_trip(tmp_path):
    vocab = Vocab.build([["AH0", "N", "'", "ü"]])
    assert Vocab.from_json(vocab.to_json()) == vocab
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.encode(["ü", "N"]) == vocab.encode(["ü", "N"])
