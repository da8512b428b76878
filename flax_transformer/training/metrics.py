"""Metrics on disk: a JSONL log, TensorBoard event files, and a PNG plot of the curves.

Every record is one line of `metrics.jsonl`: {"split": "train"|"valid"|"test", "step": int,
<name>: float, ...} (strict JSON: a non-finite value, e.g. a diverged loss, is written as
null). The same scalars go to TensorBoard as "<split>/<name>" under `workdir/tensorboard`.
`plot_curves` reads the JSONL back, so a resumed run's plot shows the whole history.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data import MissingDependencyError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "curves.png"
_find_spec = importlib.util.find_spec  # looked up at call time so tests can simulate absence


def check_tensorboard() -> None:
    """MissingDependencyError, with the install command, unless `tensorboardX` is installed
    (checked before a run loads its data, not after its first compilation)."""
    if _find_spec("tensorboardX") is None:
        raise MissingDependencyError(
            "TensorBoard event files need the 'tensorboardX' package (or pass "
            "--no-tensorboard to log to metrics.jsonl alone)", "pip install tensorboardX")


class MetricsWriter:
    """Appends records to `workdir/metrics.jsonl` and TensorBoard.

    `start_step` > 0 (a resumed run): records after that step, written by an interrupted
    earlier run past its last checkpoint, are dropped from both, so the resumed run's records
    replace them instead of repeating their steps; 0 (a fresh run): earlier records, of a
    start that saved no checkpoint, are replaced.
    """

    def __init__(self, workdir: str | Path, *, start_step: int = 0, tensorboard: bool = True):
        if tensorboard:
            check_tensorboard()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        if start_step > 0 and self.path.is_file():
            _drop_records_after(self.path, start_step)
        # A fresh run (start_step 0) replaces the records of an earlier start that saved no
        # checkpoint; a resumed one appends.
        self._file = open(self.path, "a" if start_step > 0 else "w", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR),
                                     purge_step=start_step + 1,
                                     flush_secs=30)

    def write(self, split: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        """Writes the numeric entries of `values` (others are kept in JSONL only)."""
        record: dict[str, Any] = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                record[name] = value
                continue
            if not math.isfinite(float(value)):
                record[name] = None  # strict JSON has no NaN/inf (a diverged loss)
                continue
            record[name] = float(value) if isinstance(value, float) else value
            if self._tb is not None:
                self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_record(line: str) -> dict[str, Any] | None:
    """The record on one line of a metrics file, None if the line is not one (e.g. the half
    line of a process killed while writing it)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(record, dict) or not isinstance(record.get("split"), str)
            or not isinstance(record.get("step"), int)):
        return None
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL metrics file; for a step logged twice (a run resumed from an older
    checkpoint) the later record wins. A line that is not a record is skipped with a warning
    naming it."""
    records: dict[tuple[str, int], dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is None:
            print(f"warning: {path}:{lineno}: not a metrics record, skipped", file=sys.stderr)
            continue
        records[(record["split"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["step"], r["split"]))


def _series(records, split: str, name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records
              if r["split"] == split and r.get(name) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites the JSONL file at `path` without the records whose step is > `step`, and
    without lines that are not records (a process killed while writing one leaves half a
    line, which the next record would be glued to), each dropped with a warning."""
    kept = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is None:
            print(f"warning: {path}:{lineno}: not a metrics record (cut off while it was "
                  "written?), dropped", file=sys.stderr)
        elif record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def plot_curves(workdir: str | Path, metric_name: str | None = None) -> Path:
    """Writes `workdir/curves.png`: train/valid loss, token accuracy, and the task metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = read_metrics(workdir / METRICS_FILE)
    panels = [("loss", "loss (label-smoothed)"), ("accuracy", "token accuracy")]
    if metric_name:
        panels.append((metric_name, metric_name))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (name, title) in zip(axes, panels):
        for split, style, color in (("train", "-", "C0"), ("valid", "o-", "C1"),
                                    ("test", "s", "C2")):
            steps, values = _series(records, split, name)
            if steps:
                ax.plot(steps, values, style, color=color, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = workdir / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
