"""Helpers shared by the benchmark programs: machine description, timing, RESULTS.md sections."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def add_malloc_flag(parser) -> None:
    """`--default-malloc`: opt out of `flax_transformer.runtime.keep_freed_memory`."""
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc settings (by default every process "
                        "of the run, peers included, keeps freed memory: see "
                        "flax_transformer/runtime.py)")


def configure_malloc(default_malloc: bool) -> dict[str, str]:
    """Apply the malloc setting to this process; return the environment for child processes.

    Peers in child processes (torch) get the same setting, so the comparison stays fair. On a
    GPU/TPU machine `keep_freed_memory` does nothing, and neither do the children.
    """
    from flax_transformer.runtime import KEEP_FREED_MEMORY_ENV, keep_freed_memory

    if default_malloc or not keep_freed_memory():
        return dict(os.environ)
    return {**os.environ, **KEEP_FREED_MEMORY_ENV}


def malloc_note(default_malloc: bool) -> str:
    """How the run's processes were configured, for RESULTS.md."""
    from flax_transformer.runtime import accelerator_expected

    if default_malloc:
        return "glibc malloc defaults (`--default-malloc`)"
    if accelerator_expected():
        return "glibc malloc defaults (an accelerator run: `keep_freed_memory` is for CPUs)"
    return "every process keeps freed memory (`flax_transformer.runtime.keep_freed_memory`)"


def _cpu_model() -> str:
    """The CPU's model name, with its family/model numbers (a virtual machine often reports
    only "AMD EPYC", which hides the generation) and whether it has AVX-512."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    if "avx512f" in fields.get("flags", "").split():
        details.append("AVX-512")
    return f"{name} ({', '.join(details)})" if details else name


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask when the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_jax() -> str:
    """JAX's version, backend and devices (starts JAX's backends if they are not running)."""
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        return (f"JAX {jax.__version__} on {jax.default_backend()} "
                f"({len(devices)} x {', '.join(kinds)})")
    except Exception as exc:  # noqa: BLE001 - describing the machine must never fail
        return f"JAX unavailable ({type(exc).__name__})"


def describe_machine(jax_description: str | None = None) -> str:
    """One line: CPU model, cores, memory, JAX backend and devices, library versions.

    `jax_description` (from `describe_jax()` in another process) spares this process from
    starting JAX, which on a GPU would take most of the device's memory."""
    parts = [f"CPU: {_cpu_model()}, {cpu_count()} cores"]
    mem = _memory_gb()
    if mem is not None:
        parts.append(f"{mem:.0f} GiB RAM")
    parts.append(jax_description or describe_jax())
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return "; ".join(parts)


def today() -> str:
    return datetime.date.today().isoformat()


def _sync(out):
    """Wait for asynchronous (JAX) results; other values are returned unchanged."""
    jax = sys.modules.get("jax")  # if JAX was never imported, `out` holds no JAX arrays
    return out if jax is None else jax.block_until_ready(out)


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of `fn(*args)` over `repeats` calls, after `warmup` calls
    (which include any jit compilation). JAX results are waited for with block_until_ready."""
    for _ in range(warmup):
        _sync(fn(*args))
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        _sync(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(run, steps: int, wait=_sync) -> tuple[float, float]:
    """(total, host) seconds per step over `steps` calls of `run`, waiting once at the end
    (`wait(last result)`: JAX's block_until_ready by default; torch passes `.item()`).

    host: the Python loop's time until its last step was issued. Near the total, the host is
    the bottleneck (dispatch, or a runtime that blocks on a full queue); far below it, the
    device is."""
    start = time.perf_counter()
    for _ in range(steps):
        value = run()
    issued = time.perf_counter()
    wait(value)
    return (time.perf_counter() - start) / steps, (issued - start) / steps


def command_line(module: str, argv=None) -> str:
    """`python -m benchmarks.<module>` and its arguments (`argv`, or this process's), quoted
    for a shell: the command a RESULTS.md section names."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", f"benchmarks.{module}", *map(shlex.quote, args)])


def time_alternating(paths: dict, repeats: int) -> tuple[dict, dict[str, float]]:
    """(outputs, median seconds) of each of `paths` (name: a function of no arguments): one
    call each first (compiling; its output kept), then `repeats` rounds that call every path
    once in turn, so that all of them see the same background load."""
    outputs = {name: _sync(call()) for name, call in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(max(1, repeats)):
        for name, call in paths.items():
            times[name].append(time_fn(call, repeats=1, warmup=0))
    return outputs, {name: statistics.median(t) for name, t in times.items()}


def markdown_table(header, rows) -> str:
    """A markdown table from a header row and data rows (cells are passed through str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return ":".join(re.findall(r"[A-Za-z0-9_.-]+", name))


def write_results_section(name: str, markdown_body: str, path: str | os.PathLike | None = None):
    """Create or replace the section `## {name}` of RESULTS.md, leaving other sections intact.

    The section is delimited by `<!-- {slug}:start -->` / `<!-- {slug}:end -->` markers (slug:
    the name's words joined by ':'), so only this program's own section is ever rewritten.
    Returns the path written.
    """
    path = RESULTS_PATH if path is None else Path(path)
    slug = _slug(name)
    start, end = f"<!-- {slug}:start -->", f"<!-- {slug}:end -->"
    section = f"{start}\n## {name}\n\n{markdown_body.strip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    starts, ends = old.count(start), old.count(end)
    if starts == ends == 1 and old.index(start) < old.index(end):
        head, rest = old.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + section + ("\n" + tail if tail else "")
    elif starts == ends == 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:  # a hand edit broke the markers: replacing could cut other sections, so keep both
        aside = path.with_name(f"{path.name}.{slug.replace(':', '-')}.md")
        aside.write_text(section)
        raise ValueError(
            f"{path} has {starts} '{start}' and {ends} '{end}' markers (want one pair, in "
            f"that order); it was left as it was and this run's section went to {aside}: "
            "mend the markers, then paste it in")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
    return path


# argparse `type=` converters: a bad value is a usage error naming its flag
# (`error: argument --heads: expected an integer >= 1, got '0'`, exit status 2).
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, in the order given ("1,4" -> [1, 4])."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [int(item) for item in items]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1, got {text!r}")
    return values
