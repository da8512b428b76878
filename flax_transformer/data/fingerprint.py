"""What a run learned from: a fingerprint of a task's encoded splits, saved beside its
tokenizers, so that ``--resume`` refuses data that changed since the run started (an edited
file, an updated package) instead of quietly training on something else."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax_transformer.data.tasks import SPLITS, Task

DATA_FILE = "data.json"


def data_fingerprint(task: Task, splits: Sequence[str] = SPLITS) -> dict[str, dict[str, Any]]:
    """{split: {"examples": count, "sha256": hex digest of its encoded examples}} for each of
    `splits`."""
    out = {}
    for split in splits:
        digest = hashlib.sha256()
        examples = task.split(split)
        for example in examples:
            digest.update(repr((example.src, example.tgt, example.refs)).encode("utf-8"))
        out[split] = {"examples": len(examples), "sha256": digest.hexdigest()}
    return out


def save_data_fingerprint(task: Task, directory: str | Path) -> None:
    """Writes ``directory/data.json`` (the run's tokenizer directory)."""
    path = Path(directory) / DATA_FILE
    path.write_text(json.dumps(data_fingerprint(task), indent=1) + "\n")


def changed_splits(task: Task, directory: str | Path,
                   splits: Sequence[str] = SPLITS) -> list[str]:
    """One line per split (of `splits`) of `task` that differs from the fingerprint saved in
    `directory`, e.g. "train: 1,200 examples then, 1,500 now"; empty when they agree or
    nothing was saved (a run from before fingerprints)."""
    path = Path(directory) / DATA_FILE
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    now = data_fingerprint(task, splits)  # only those asked: train is most of the hashing
    changed = []
    for split in splits:
        then = saved.get(split)
        if then is None or then == now[split]:
            continue
        what = (f"{then['examples']:,} examples then, {now[split]['examples']:,} now"
                if then["examples"] != now[split]["examples"] else
                f"{then['examples']:,} examples then and now, with other contents")
        changed.append(f"{split}: {what}")
    return changed
