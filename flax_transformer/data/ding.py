"""Sentence pairs from Debian's `trans-de-en` (the TU Chemnitz "Ding" German-English dictionary).

Each dictionary line is ``German :: English``; both sides list the same sub-entries separated by
`` | `` and alternatives within a sub-entry separated by ``; ``. Besides words, many sub-entries
are example sentences ("Er spricht gut Deutsch. :: He has a good command of German."). This
module keeps those: the first alternative of each side, when the German one starts with a
capital, has at least three words and both end with ``.``, ``!`` or ``?``. Parenthesised
optional words are dropped; pairs with grammar marks (``{}``, ``[]``) or slashed variants are
skipped. About 16.5k pairs result (2023 edition). Splits are by a stable hash of the
dictionary entry's headword, so the examples of one entry never straddle train and test.
"""

from __future__ import annotations

import re
from pathlib import Path

from flax_transformer.data.tasks import MissingDependencyError, hash_split, read_lines

DING_PATH = Path("/usr/share/trans/de-en")
DING_HINT = ("apt-get install trans-de-en (Debian/Ubuntu), or pass --data-dir DIR (data_dir) "
             "holding its 'de-en' file")
_SENTENCE_END = re.compile(r"[.!?]$")
_OPTIONAL = re.compile(r"\s*\([^()]*\)")
_SKIP = re.compile(r"[{}\[\]/~()]")

Pair = tuple[str, str]


def ding_path(data_dir: str | Path | None = None) -> Path:
    """``data_dir/de-en`` if given, else the file the Debian package installs."""
    path = Path(data_dir) / "de-en" if data_dir is not None else DING_PATH
    if not path.is_file():
        raise MissingDependencyError(f"the trans-de-en corpus needs the dictionary file {path}",
                                     DING_HINT)
    return path


def _sentence(text: str) -> str | None:
    """The first alternative, optional parts removed, or None if it is not a clean sentence."""
    text = _OPTIONAL.sub("", text.split("; ")[0]).strip()
    if not _SENTENCE_END.search(text) or _SKIP.search(text):
        return None
    return " ".join(text.split())


def parse_line(line: str, where: str) -> tuple[str, list[Pair]]:
    """(headword, sentence pairs) of one dictionary line; ``where`` ("file:line") names it in
    the ValueError raised for a malformed line."""
    sides = line.split(" :: ")
    if len(sides) != 2:
        raise ValueError(f"{where}: expected 'German :: English'")
    german, english = (side.split(" | ") for side in sides)
    if len(german) != len(english):
        raise ValueError(f"{where}: {len(german)} German but {len(english)} English sub-entries "
                         "(separated by ' | ')")
    pairs = []
    for de, en in zip(german, english):
        de, en = _sentence(de), _sentence(en)
        if de and en and de[0].isupper() and len(de.split()) >= 3:
            pairs.append((de, en))
    return german[0].strip(), pairs


def read_ding_pairs(path: str | Path) -> list[tuple[str, Pair]]:
    """(headword, (german, english)) for every example sentence in the dictionary file."""
    out = []
    for lineno, line in read_lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        headword, pairs = parse_line(line, f"{path}:{lineno}")
        out.extend((headword, pair) for pair in pairs)
    if not out:
        raise ValueError(f"{path}: no example sentences found (empty dataset)")
    return out


def split_ding(pairs: list[tuple[str, Pair]], fractions=(0.9, 0.05, 0.05)) -> dict[str, list]:
    """train/valid/test by a stable hash of each entry's headword; duplicates dropped."""
    out: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    seen: set[Pair] = set()
    for headword, pair in pairs:
        if pair not in seen:
            seen.add(pair)
            out[hash_split(headword, fractions)].append(pair)
    return out
