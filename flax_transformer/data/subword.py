"""SentencePiece subword tokenizer with the package's special ids (pad 0, bos 1, eos 2, unk 3)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flax_transformer.data.vocab import EOS_ID, UNK, strip_special

MODEL_FILENAME = "subword.model"
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\).*<= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_NO_TEXT = re.compile(r"sentences_\.empty\(\)|all_chars_count")
MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length; longer lines are dropped
# SentencePiece's built-in normalization rules (its trainer's normalization_rule_name)
NORMALIZATION_RULES = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "SubwordTokenizer needs the 'sentencepiece' package: pip install sentencepiece"
        ) from err
    return sentencepiece


class SubwordTokenizer:
    """A trained SentencePiece model held in memory (its serialized bytes)."""

    def __init__(self, model_proto: bytes) -> None:
        spm = _sentencepiece()
        self._proto = bytes(model_proto)
        self.vocab_size_requested: int | None = None
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        expected = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
        actual = {k: getattr(self._sp, f"{k}_id")() for k in expected}
        if actual != expected:
            raise ValueError(f"subword model has special ids {actual}, expected {expected}")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        model_path: str | Path | None = None,
        character_coverage: float = 1.0,
        seed: int = 0,
        normalization: str = "identity",
    ) -> SubwordTokenizer:
        """Trains a model on ``texts`` deterministically (one thread, fixed seed, no sampling).

        If ``vocab_size`` is larger than the corpus supports, the largest size SentencePiece
        accepts is used instead (see ``vocab_size_requested`` / ``len``); below the number of
        distinct characters (plus the 4 special pieces) it is a ValueError. Every sentence is
        used, however long. The model is built in memory; it is written to ``model_path`` only
        if one is given.

        ``normalization`` (one of NORMALIZATION_RULES) is the rule the model applies to every
        text it encodes; it is stored in the model, so a loaded model keeps its own. The
        default "identity" changes no character, so decoded text can hold whatever the
        training text held (``…``, ``ﬁ``, full-width digits), as raw BLEU references do.
        SentencePiece's own default, "nmt_nfkc" (the rule of models trained here before),
        folds them (``…`` -> ``...``). Whitespace handling is separate and unchanged: runs of
        spaces collapse, leading and trailing ones are dropped.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
        if normalization not in NORMALIZATION_RULES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_RULES}, got "
                             f"{normalization!r}")
        sentences = [t for t in (s.strip() for s in texts) if t]
        if not sentences:
            raise ValueError("cannot train a subword model on an empty corpus")
        spm = _sentencepiece()
        options = {
            "model_type": model_type,
            "character_coverage": character_coverage,
            "max_sentence_length": max(MAX_SENTENCE_BYTES, *(len(t.encode()) for t in sentences)),
            "normalization_rule_name": normalization,
        }
        size = vocab_size
        for _ in range(3):
            try:
                proto = cls._train_once(spm, sentences, size, seed, options)
                break
            except RuntimeError as err:
                match = _TOO_LARGE.search(str(err))
                if match is None or int(match.group(2)) >= size:
                    raise _training_error(err, vocab_size, len(sentences)) from None
                size = int(match.group(2))
        else:  # pragma: no cover - SentencePiece kept rejecting its own suggestion
            raise RuntimeError(f"could not find a usable vocabulary size below {vocab_size}")
        tokenizer = cls(proto)
        tokenizer.vocab_size_requested = vocab_size
        if model_path is not None:
            Path(model_path).write_bytes(proto)
        return tokenizer

    @staticmethod
    def _train_once(
        spm: Any, sentences: list[str], size: int, seed: int, options: dict[str, Any]
    ) -> bytes:
        spm.set_random_generator_seed(seed)
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            vocab_size=size,
            **options,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        return writer.getvalue()

    def __len__(self) -> int:
        return int(self._sp.get_piece_size())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self._proto == other._proto

    def __repr__(self) -> str:
        return f"SubwordTokenizer(size={len(self)})"

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        """Piece ids of ``text`` (no bos; eos only if ``add_eos``)."""
        ids = [int(i) for i in self._sp.encode(text)]
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def symbol_of(self, token_id: int) -> str:
        """The piece for ``token_id`` (``▁`` marks a word's start); ids outside the model read
        as ``<unk>``."""
        return str(self._sp.id_to_piece(token_id)) if 0 <= token_id < len(self) else UNK

    def encode_pieces(self, text: str) -> list[str]:
        return list(self._sp.encode(text, out_type=str))

    def normalize(self, text: str) -> str:
        """``text`` as ``decode(encode(text))`` would give it back barring unknown pieces: with
        the model's own normalization (see ``train``: characters unchanged for models trained
        here now, NFKC for older ones, ``…`` -> ``...``), whitespace collapsed."""
        return str(self._sp.normalize(text)).replace("\u2581", " ").strip()

    def decode(self, ids: Iterable[int]) -> str:
        """Detokenized text of the ids up to the first eos (pad and bos skipped)."""
        kept = [i for i in strip_special(list(ids)) if i < len(self)]
        return str(self._sp.decode(kept))

    def save(self, directory: str | Path) -> Path:
        """Writes ``directory/subword.model`` and returns its path."""
        path = Path(directory) / MODEL_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> SubwordTokenizer:
        """Loads ``subword.model`` from a directory, or a ``.model`` file given directly."""
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / MODEL_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no subword model at {path}")
        return cls(path.read_bytes())


def _training_error(err: RuntimeError, vocab_size: int, num_sentences: int) -> Exception:
    """A ValueError naming the problem and its fix for SentencePiece errors caused by the data
    or the requested size; other errors are returned unchanged."""
    too_small = _TOO_SMALL.search(str(err))
    if too_small is not None:
        needed = int(too_small.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is below the {needed} pieces the training text needs (its "
            f"distinct characters plus the 4 special pieces); raise vocab_size "
            f"(train.py: --subword-vocab-size) to at least {needed}"
        )
    if _NO_TEXT.search(str(err)):
        return ValueError(
            f"SentencePiece found no characters to train on in the {num_sentences} training "
            "sentences (all are removed by its normalization); check the training data"
        )
    return err
