"""Synthetic copy and reverse tasks for tests and smoke runs.

Sequences of symbols ``a``, ``b``, ... (``num_symbols`` of them) with lengths uniform in
``[min_len, max_len]``, drawn with numpy's Generator. Each split has its own random stream
derived from ``(seed, split)``, so changing one split's size leaves the others unchanged.
Splits may share a few (short) sequences by chance. Metric: sequence accuracy (exact match).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np

from flax_transformer.data.tasks import Example, Task, reject_options
from flax_transformer.data.vocab import EOS_ID, Vocab

DEFAULT_SIZES = (5000, 200, 200)


def symbol_names(num_symbols: int) -> list[str]:
    """``a``..``z`` for up to 26 symbols, ``s0``, ``s1``, ... beyond that."""
    if num_symbols < 1:
        raise ValueError(f"num_symbols must be >= 1, got {num_symbols}")
    if num_symbols <= 26:
        return list(string.ascii_lowercase[:num_symbols])
    return [f"s{i}" for i in range(num_symbols)]


def random_sequences(
    rng: np.random.Generator, count: int, num_symbols: int, min_len: int, max_len: int
) -> list[list[int]]:
    """``count`` sequences of symbol indices in [0, num_symbols)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    lengths = rng.integers(min_len, max_len + 1, size=count)
    return [rng.integers(0, num_symbols, size=int(n)).tolist() for n in lengths]


def _load_synthetic(
    name: str,
    *,
    seed: int,
    num_symbols: int,
    min_len: int,
    max_len: int,
    sizes: tuple[int, int, int],
    max_examples: int | None,
    files: dict[str, Any],
) -> Task:
    reject_options(name, **files)
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"sizes must be 3 non-negative split sizes, got {sizes}")
    vocab = Vocab(symbol_names(num_symbols))
    offset = len(vocab) - num_symbols
    splits = {}
    for index, (split, size) in enumerate(zip(("train", "valid", "test"), sizes)):
        if max_examples is not None:
            size = min(size, max_examples)
        rng = np.random.default_rng([seed, index])
        examples = []
        for seq in random_sequences(rng, size, num_symbols, min_len, max_len):
            src = [offset + s for s in seq]
            tgt = src[::-1] if name == "reverse" else list(src)
            refs = (tuple(vocab.decode(tgt)),)
            examples.append(Example(src + [EOS_ID], tgt + [EOS_ID], refs))
        splits[split] = examples
    info = {"seed": seed, "num_symbols": num_symbols, "min_len": min_len, "max_len": max_len}
    return Task(name=name, src_vocab=vocab, tgt_vocab=vocab, info=info, **splits)


def load_copy_task(
    *,
    seed: int = 0,
    num_symbols: int = 20,
    min_len: int = 1,
    max_len: int = 20,
    sizes: tuple[int, int, int] = DEFAULT_SIZES,
    max_examples: int | None = None,
    tokenizer_dir: str | Path | None = None,
    **files: Any,
) -> Task:
    """Target = source. ``files`` (train_file, ..., data_dir) must be None."""
    del tokenizer_dir  # the vocabulary is fixed by num_symbols
    return _load_synthetic(
        "copy",
        seed=seed,
        num_symbols=num_symbols,
        min_len=min_len,
        max_len=max_len,
        sizes=tuple(sizes),
        max_examples=max_examples,
        files=files,
    )


def load_reverse_task(
    *,
    seed: int = 0,
    num_symbols: int = 20,
    min_len: int = 1,
    max_len: int = 20,
    sizes: tuple[int, int, int] = DEFAULT_SIZES,
    max_examples: int | None = None,
    tokenizer_dir: str | Path | None = None,
    **files: Any,
) -> Task:
    """Target = source reversed. ``files`` (train_file, ..., data_dir) must be None."""
    del tokenizer_dir
    return _load_synthetic(
        "reverse",
        seed=seed,
        num_symbols=num_symbols,
        min_len=min_len,
        max_len=max_len,
        sizes=tuple(sizes),
        max_examples=max_examples,
        files=files,
    )
