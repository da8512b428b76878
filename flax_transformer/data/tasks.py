"""Tasks (encoded splits + tokenizers + metric) and the registry behind ``load_task``.

Token convention for every task: sources and targets are lists of ids that end with eos (2) and
carry no bos. Training code builds the decoder input as ``[bos] + tgt[:-1]`` (see
``batching.make_batches``); predictions are read up to their first eos.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flax_transformer.data.subword import SubwordTokenizer
from flax_transformer.data.vocab import SPECIALS, UNK_ID, Vocab, strip_special

SPLITS = ("train", "valid", "test")
TASK_FILE = "task.json"
Tokenizer = Vocab | SubwordTokenizer


@dataclass(frozen=True, slots=True)
class Example:
    """One encoded example. ``refs`` holds every acceptable reference for the metric."""

    src: list[int]
    tgt: list[int]
    refs: tuple[Any, ...] = ()


@dataclass
class Task:
    """A dataset ready for training: encoded splits, tokenizers and the task metric.

    The base class treats text as whitespace-separated symbols and scores sequence accuracy
    (exact match of the ids before eos); subclasses change tokenization and metric.
    ``warnings``: what the loader found amiss in the data it read (e.g. `seen_in_training`);
    `data_warnings` adds what the encoded splits show.
    """

    name: str
    src_vocab: Tokenizer
    tgt_vocab: Tokenizer
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    metric_name: str = "sequence_accuracy"
    higher_is_better: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def src_vocab_size(self) -> int:
        return len(self.src_vocab)

    @property
    def tgt_vocab_size(self) -> int:
        return len(self.tgt_vocab)

    @property
    def shared_vocab(self) -> bool:
        return self.src_vocab is self.tgt_vocab

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def source_symbols(self, text: str) -> list[str]:
        return text.split()

    def target_symbols(self, text: str) -> list[str]:
        return text.split()

    def encode_source(self, text: str) -> list[int]:
        """Source ids of ``text``, ending with eos."""
        return self.src_vocab.encode(self.source_symbols(text), add_eos=True)

    def encode_target(self, text: str) -> list[int]:
        """Target ids of ``text``, ending with eos (no bos)."""
        return self.tgt_vocab.encode(self.target_symbols(text), add_eos=True)

    def decode_source(self, ids: Sequence[int]) -> str:
        return " ".join(self.src_vocab.decode(ids))

    def decode_target(self, ids: Sequence[int]) -> str:
        """Text of the ids up to the first eos (pad and bos skipped)."""
        return " ".join(self.tgt_vocab.decode(ids))

    def score(self, predictions: Sequence[Sequence[int]], examples: Sequence[Example]) -> dict:
        """Sequence accuracy: fraction of predictions equal to the target (up to eos)."""
        check_predictions(predictions, examples)
        hits = sum(strip_special(p) == strip_special(e.tgt) for p, e in zip(predictions, examples))
        return {self.metric_name: hits / len(examples), "num_examples": len(examples)}

    def data_warnings(self, splits: Sequence[str] = SPLITS) -> list[str]:
        """The loader's ``warnings`` and `unknown_text_warnings` of `splits`: data that
        cannot measure, or teach, what a run seems to (training prints them for every split,
        scoring for the splits it scores)."""
        return [*self.warnings, *unknown_text_warnings(self, splits)]

    def save_tokenizers(self, directory: str | Path) -> None:
        """Writes the tokenizers and ``task.json`` so that ``restore_task`` can rebuild them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {"src": _save_tokenizer(self.src_vocab, directory, "src")}
        files["tgt"] = (
            files["src"] if self.shared_vocab else _save_tokenizer(self.tgt_vocab, directory, "tgt")
        )
        meta = {
            "name": self.name,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "files": files,
            "info": self.info,
        }
        (directory / TASK_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def seen_in_training(split: str, sources: Sequence[str], train_sources: Iterable[str],
                     where: str) -> str | None:
    """A warning when some of the ``sources`` of ``split`` (read from ``where``, a user's
    file) also occur among ``train_sources`` (compared with whitespace collapsed), else None.
    Loaders whose splits are disjoint by construction need not ask."""
    seen = {" ".join(text.split()) for text in train_sources}
    shared = sum(" ".join(text.split()) in seen for text in sources)
    if not shared:
        return None
    return (f"{split} ({where}): {shared} of its {len(sources)} sources also occur in the "
            f"training split, so its scores overstate quality on unseen text (the model "
            "trained on them); remove them from one of the files")


def _wordless_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids that carry no word of their own: the specials, and symbols without a letter or
    digit (spaces, word-start marks, punctuation)."""
    return {i for i in range(len(tokenizer)) if i < len(SPECIALS)
            or not any(c.isalnum() for c in tokenizer.symbol_of(i))}


def unknown_text_warnings(task: Task, splits: Sequence[str] = SPLITS) -> list[str]:
    """One warning per split of `splits` and side (source, target) where more than half of
    the examples are unknown to the tokenizer: <unk> tokens and nothing else but spaces and
    punctuation, as text in another script than the tokenizer was built from gives. (A
    stricter "all of them" would miss a file with a few numbers or names in it.) The
    training split can be unknown only to a reused tokenizer (`init_from`): one built here
    is built from it."""
    out = []
    wordless: dict[int, set[int]] = {}  # by id(tokenizer): source and target may share one
    for split in splits:
        examples = task.split(split)
        if not examples:
            continue
        for side, tokenizer in (("source", task.src_vocab), ("target", task.tgt_vocab)):
            if id(tokenizer) not in wordless:
                wordless[id(tokenizer)] = _wordless_ids(tokenizer)
            unknown = sum(UNK_ID in ids and wordless[id(tokenizer)].issuperset(ids) for ids in
                          (e.src if side == "source" else e.tgt for e in examples))
            if 2 * unknown <= len(examples):
                continue
            if split == "train":
                why, effect = ("a tokenizer reused from another run (--init-from) that never "
                               "saw this script", "the model cannot learn from them")
            else:
                why, effect = ("another script or alphabet than the training text",
                               "its scores measure nothing the model could learn")
            out.append(f"{split}: {unknown} of its {len(examples)} {side}s are unknown to the "
                       f"tokenizer (nothing but <unk>, spaces and punctuation: {why}?), so "
                       f"{effect}; check the {split} data")
    return out


def check_predictions(predictions: Sequence[Any], examples: Sequence[Example]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")


def _save_tokenizer(tokenizer: Tokenizer, directory: Path, stem: str) -> str:
    if isinstance(tokenizer, Vocab):
        name = f"{stem}_vocab.json"
        tokenizer.save(directory / name)
    elif isinstance(tokenizer, SubwordTokenizer):
        name = f"{stem}_subword.model"
        (directory / name).write_bytes(tokenizer.model_proto)
    else:
        raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}")
    return name


def _load_tokenizer(path: Path) -> Tokenizer:
    return Vocab.load(path) if path.suffix == ".json" else SubwordTokenizer.load(path)


def load_tokenizers(directory: str | Path) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) tokenizers saved by ``Task.save_tokenizers``; shared stays shared."""
    directory = Path(directory)
    meta = _read_meta(directory)
    src = _load_tokenizer(directory / meta["files"]["src"])
    same = meta["files"]["tgt"] == meta["files"]["src"]
    tgt = src if same else _load_tokenizer(directory / meta["files"]["tgt"])
    return src, tgt


def restore_task(directory: str | Path) -> Task:
    """A task with the saved tokenizers and metric but empty splits (for prediction)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    module_name, _, class_name = str(meta.get("class", "")).partition(":")
    # Only this library's modules, or one the program has imported (a user's own task), are
    # looked in: a work directory's file never makes Python import anything else.
    if module_name.split(".")[0] != __name__.split(".")[0] and module_name not in sys.modules:
        raise ValueError(f"{directory / TASK_FILE}: task class {meta.get('class')!r} is not "
                         "from flax_transformer or a module this program imported; import "
                         "the module that defines it first")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"{directory / TASK_FILE}: {meta.get('class')!r} is not a Task class")
    src, tgt = load_tokenizers(directory)
    return cls(
        name=meta["name"],
        src_vocab=src,
        tgt_vocab=tgt,
        train=[],
        valid=[],
        test=[],
        metric_name=meta["metric_name"],
        higher_is_better=meta["higher_is_better"],
        info=meta.get("info", {}),
    )


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TASK_FILE} in {directory}: the run's tokenizers are "
                                "missing, so its outputs cannot be decoded (code that builds "
                                "a Task saves them with Task.save_tokenizers)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid task file ({err})") from None
    missing = [key for key in ("class", "name", "metric_name", "higher_is_better")
               if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path}: not a valid task file (missing {', '.join(missing)})")
    return meta


class MissingDependencyError(ImportError):
    """An optional dependency is missing; ``hint`` is the command that installs it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}; install it with: {hint}")
        self.hint = hint


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) for each line of a UTF-8 file. A leading
    byte-order mark is dropped; a line that is not UTF-8 raises ValueError naming ``path:line``.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: byte 0x{err.object[err.start]:02x} at column "
                    f"{err.start + 1} is not UTF-8; the file must be UTF-8"
                ) from None
            yield lineno, line.rstrip("\r\n")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) from the md5 of ``key``: the same on every run and machine."""
    digest = hashlib.md5(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(key: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
    """The split ('train', 'valid' or 'test') that ``key`` belongs to, by stable hash."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1: {fractions}"
        )
    x = stable_fraction(key)
    if x < fractions[0]:
        return "train"
    return "valid" if x < fractions[0] + fractions[1] else "test"


def cap(examples: list[Example], max_examples: int | None) -> list[Example]:
    """The first ``max_examples`` examples (all if None)."""
    if max_examples is None:
        return examples
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    return examples[:max_examples]


def reject_options(task: str, **options: Any) -> None:
    """Raises ValueError if an option that ``task`` does not use was given."""
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"task {task!r} does not take option(s): {', '.join(given)}")


_REGISTRY: dict[str, str | Callable[..., Task]] = {
    "g2p": "flax_transformer.data.g2p:load_g2p_task",
    "translate": "flax_transformer.data.translate:load_translate_task",
    "copy": "flax_transformer.data.synthetic:load_copy_task",
    "reverse": "flax_transformer.data.synthetic:load_reverse_task",
}


def register_task(name: str, loader: Callable[..., Task]) -> None:
    """Adds a task loader; it is called with the keyword arguments of ``load_task``."""
    _REGISTRY[name] = loader


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def load_task(
    name: str,
    *,
    seed: int = 0,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    max_examples: int | None = None,
    tokenizer_dir: str | Path | None = None,
    **options: Any,
) -> Task:
    """Loads a registered task. ``max_examples`` caps every split; ``tokenizer_dir`` reuses
    tokenizers saved by ``Task.save_tokenizers`` instead of building new ones. Task-specific
    ``options`` are passed through to the loader."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(available_tasks())}")
    loader = _REGISTRY[name]
    if isinstance(loader, str):
        module_name, _, func_name = loader.partition(":")
        loader = getattr(importlib.import_module(module_name), func_name)
    return loader(
        seed=seed,
        train_file=train_file,
        valid_file=valid_file,
        test_file=test_file,
        data_dir=data_dir,
        max_examples=max_examples,
        tokenizer_dir=tokenizer_dir,
        **options,
    )
