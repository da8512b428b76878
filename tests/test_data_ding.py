"""Debian trans-de-en (Ding dictionary) example sentences as a translate corpus."""

import pytest

from flax_transformer.data import MissingDependencyError, load_task
from flax_transformer.data.ding import parse_line, read_ding_pairs, split_ding
from flax_transformer.training.config import TrainingConfig

# The dictionary's format: comments, sub-entries ' | ', alternatives '; ', grammar marks.
ENTRIES = [  # (German side, English side) of each dictionary line
    ("Aal {m} | Er ist glatt wie ein Aal.", "eel | He is as slippery as an eel."),
    ("Abend {m} | Guten Abend! | Der Abend war (sehr) lang.",
     "evening | Good evening! | The evening was long."),
    ("Arbeit {f} | Die Arbeit ist getan.; Alles erledigt. | Er/Sie arbeitet viel.",
     "work | The work is done.; All done. | He/She works a lot."),
    ("Buch {n} | Ich lese ein Buch. | Das Buch {n} liegt hier.",
     "book | I am reading a book. | The book lies here."),
    ("Haus {n} | Das Haus ist alt. | Wir bauen ein Haus.",
     "house | The house is old. | We are building a house."),
    ("Hund {m} | Der Hund bellt laut.", "dog | The dog barks loudly."),
]
FIXTURE = "# Version :: test\n# License :: GPL\n\n" + "".join(
    f"{de} :: {en}\n" for de, en in ENTRIES)


@pytest.fixture
def ding_dir(tmp_path):
    (tmp_path / "de-en").write_text(FIXTURE, encoding="utf-8")
    return tmp_path


def test_parse_line_keeps_clean_example_sentences():
    head, pairs = parse_line(" :: ".join(ENTRIES[1]), "f:1")
    assert head == "Abend {m}"
    # "Guten Abend!" has two words: too short. Optional "(sehr)" is dropped.
    assert pairs == [("Der Abend war lang.", "The evening was long.")]
    _, pairs = parse_line(" :: ".join(ENTRIES[2]), "f:2")
    assert pairs == [("Die Arbeit ist getan.", "The work is done.")]  # first alternative; no '/'


def test_read_pairs_skips_comments_and_words(ding_dir):
    pairs = read_ding_pairs(ding_dir / "de-en")
    assert [p for _, p in pairs] == [
        ("Er ist glatt wie ein Aal.", "He is as slippery as an eel."),
        ("Der Abend war lang.", "The evening was long."),
        ("Die Arbeit ist getan.", "The work is done."),
        ("Ich lese ein Buch.", "I am reading a book."),
        ("Das Haus ist alt.", "The house is old."),
        ("Wir bauen ein Haus.", "We are building a house."),
        ("Der Hund bellt laut.", "The dog barks loudly."),
    ]


@pytest.mark.parametrize("line, message", [
    ("Haus {n} | Das Haus :: house", "2 German but 1 English"),
    ("ohne Trenner", "expected 'German :: English'"),
    ("a :: b :: c", "expected 'German :: English'"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "de-en"
    path.write_text(f"# comment\nHund {{m}} :: dog\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:3: ({message})"):
        read_ding_pairs(path)


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "de-en"
    path.write_bytes("# comment\nHund {m} :: dog\nB\u00e4r {m} :: bear\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:3: .*must be UTF-8"):
        read_ding_pairs(path)


def test_no_sentences_is_an_empty_dataset(tmp_path):
    path = tmp_path / "de-en"
    path.write_text("# only words\nHund {m} :: dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty dataset"):
        read_ding_pairs(path)


def test_split_by_headword_is_stable_disjoint_and_complete(ding_dir):
    pairs = read_ding_pairs(ding_dir / "de-en")
    splits = split_ding(pairs, fractions=(0.5, 0.25, 0.25))
    assert splits == split_ding(list(pairs), fractions=(0.5, 0.25, 0.25))
    flat = [p for split in splits.values() for p in split]
    assert sorted(flat) == sorted({p for _, p in pairs})
    # Both sentences of the "Haus" entry land in the same split.
    where = {p: name for name, split in splits.items() for p in split}
    assert where[("Das Haus ist alt.", "The house is old.")] == \
        where[("Wir bauen ein Haus.", "We are building a house.")]
    # A sentence pair repeated under another entry is kept once.
    repeated = [("Zebra {n}", pair) for _, pair in pairs[:2]]
    assert split_ding(pairs + repeated) == split_ding(pairs)


def test_load_task_with_the_corpus(ding_dir):
    task = load_task("translate", corpus="trans-de-en", data_dir=ding_dir,
                     fractions=(1.0, 0.0, 0.0), vocab_size=60)
    assert task.info["source"] == str(ding_dir / "de-en")
    assert [e.refs[0] for e in task.train][:2] == ["He is as slippery as an eel.",
                                                   "The evening was long."]
    assert task.decode_source(task.train[0].src) == "Er ist glatt wie ein Aal."


def test_missing_dictionary_carries_install_hint(tmp_path):
    with pytest.raises(MissingDependencyError, match="apt-get install trans-de-en") as info:
        load_task("translate", corpus="trans-de-en", data_dir=tmp_path)
    assert "apt-get install trans-de-en" in info.value.hint


def test_corpus_errors():
    with pytest.raises(ValueError, match="corpus='wiki' is not known"):
        load_task("translate", corpus="wiki")
    with pytest.raises(ValueError, match="corpus='wiki' is not known"):
        TrainingConfig(task="translate", corpus="wiki")
    with pytest.raises(ValueError, match="corpus is an option of task 'translate'"):
        TrainingConfig(task="g2p", corpus="bible")
    with pytest.raises(ValueError, match="either corpus or train_file"):
        TrainingConfig(task="translate", corpus="bible", train_file="x.tsv")
    with pytest.raises(ValueError, match="not both"):
        load_task("translate", corpus="bible", train_file="x.tsv")
