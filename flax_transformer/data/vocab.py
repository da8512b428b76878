"""Symbol vocabulary with the package's fixed special token ids."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


class Vocab:
    """Maps symbols (characters, phonemes, words) to ids and back.

    Ids 0..3 are always ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; ordinary symbols follow in
    the order given to the constructor.
    """

    def __init__(self, symbols: Iterable[str] = ()) -> None:
        self._itos: list[str] = list(SPECIALS)
        self._stoi: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
        for symbol in symbols:
            if not isinstance(symbol, str) or not symbol:
                raise ValueError(f"vocabulary symbols must be non-empty strings, got {symbol!r}")
            if symbol in self._stoi:
                raise ValueError(f"duplicate or reserved vocabulary symbol {symbol!r}")
            self._stoi[symbol] = len(self._itos)
            self._itos.append(symbol)

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]], min_count: int = 1) -> Vocab:
        """Builds a vocabulary from symbol sequences: frequency descending, then symbol."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(s for seq in sequences for s in seq)
        for special in SPECIALS:
            counts.pop(special, None)
        kept = [s for s, c in counts.items() if c >= min_count]
        kept.sort(key=lambda s: (-counts[s], s))
        return cls(kept)

    @property
    def symbols(self) -> list[str]:
        """All symbols in id order, specials included."""
        return list(self._itos)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._itos == other._itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    def id_of(self, symbol: str) -> int:
        return self._stoi.get(symbol, UNK_ID)

    def symbol_of(self, token_id: int) -> str:
        """The symbol for ``token_id``; ids outside the vocabulary read as ``<unk>``."""
        return self._itos[token_id] if 0 <= token_id < len(self._itos) else UNK

    def encode(self, symbols: Iterable[str], *, add_eos: bool = False) -> list[int]:
        """Symbol ids; unknown symbols map to ``UNK_ID`` (3). Optionally appends ``EOS_ID``."""
        ids = [self._stoi.get(s, UNK_ID) for s in symbols]
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Symbols up to the first eos; pad and bos are skipped, unknown ids read ``<unk>``."""
        return [self.symbol_of(i) for i in strip_special(list(ids))]

    def to_json(self) -> str:
        return json.dumps({"symbols": self._itos[len(SPECIALS) :]}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("symbols"), list):
            raise TypeError("vocabulary JSON must be an object with a 'symbols' list")
        return cls(data["symbols"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def strip_special(ids: Sequence[int]) -> list[int]:
    """Ids up to the first eos, without pad and bos (for comparing id sequences)."""
    out: list[int] = []
    for token_id in ids:
        token_id = int(token_id)
        if token_id == EOS_ID:
            break
        if token_id not in (PAD_ID, BOS_ID):
            out.append(token_id)
    return out
