"""Where a train step's time goes: kernels per step, device busy time, host time by activity,
for ours and the Flax-layers peer (the models of `bench_train`).

    python -m benchmarks.profile_train [--configs small] [--attention-impl dense xla]
                                       [--steps 5] [--steps-per-call 1] [--trace-dir DIR]

For each framework: the top-level ops of the compiled step's HLO (on a GPU each is about one
kernel launch or one node of XLA's CUDA graph), then a `jax.profiler` trace of `--steps`
calls, read back from its perfetto JSON: device ops per step, device busy ms per step (the
sum of op durations), device span ms per step (first op's start to last op's end), wall ms
per step (under the profiler), and the host activities with the most self time per step
(e.g. `cuGraphLaunch`). With `--steps-per-call K` the HLO count is of the call (its loop is
one op) and the other columns are divided by K. Where device busy time is far below wall
time, the device waits on the host: fewer launches (or several steps per call) pay, faster
kernels do not. On a CPU the trace has no device ops; the HLO count and host rows remain.
Prints a table; nothing is written to RESULTS.md (the findings go there by hand).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from benchmarks import bench_train, common

# HLO instructions that launch nothing: bookkeeping of buffers and tuples.
NON_KERNEL_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
                  "opt-barrier"}
_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*? ([a-z][a-z0-9\-]*)\(")


def entry_op_counts(hlo_text: str) -> collections.Counter:
    """Opcodes of the ENTRY computation's instructions in compiled HLO text, minus those that
    launch nothing (NON_KERNEL_OPS)."""
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in this HLO text")
    body = hlo_text[start:]
    body = body[:body.find("\n}") if "\n}" in body else len(body)]
    ops = collections.Counter()
    for line in body.splitlines()[1:]:
        match = _HLO_OP.match(line)
        if match and match.group(1) not in NON_KERNEL_OPS:
            ops[match.group(1)] += 1
    return ops


def self_times(events: list[dict]) -> collections.Counter:
    """Microseconds per event name, each event's duration minus that of the events nested in
    it on the same thread (so a wrapper such as "Execute" does not hide what it waits on)."""
    totals = collections.Counter()
    threads = collections.defaultdict(list)
    for e in events:
        threads[e["pid"], e["tid"]].append(e)
    for thread in threads.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self time so far]
        for e in thread:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, own = stack.pop()
                totals[name] += own
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
        for _, name, own in stack:
            totals[name] += own
    return totals


def summarize_trace(events: list[dict], calls: int, top: int = 5) -> dict:
    """Per-call figures from perfetto trace events (`traceEvents` of a `jax.profiler` trace):
    device ops, device busy ms (op durations summed), device span ms (first op's start to last
    op's end; 0 with no device ops) and the `top` host activities by self time in ms per call
    (Python frames, named "$file:line ...", left out)."""
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    on_device = ["/device:" in processes.get(e["pid"], "")
                 and "CPU" not in processes.get(e["pid"], "") for e in complete]
    device = [e for e, d in zip(complete, on_device) if d]
    host = self_times([e for e, d in zip(complete, on_device)
                       if not d and not e["name"].startswith("$")])
    span = (max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)
            if device else 0.0)
    return dict(device_ops=len(device) / calls,
                device_busy_ms=sum(e["dur"] for e in device) / calls / 1e3,
                device_span_ms=span / calls / 1e3,
                host_top=[(name, us / calls / 1e3) for name, us in host.most_common(top)])


def read_trace(trace_dir: Path) -> list[dict]:
    """The events of the perfetto trace `jax.profiler.trace(..., create_perfetto_trace=True)`
    wrote under `trace_dir`."""
    found = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(found[-1], "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(run, steps: int, trace_dir: Path) -> tuple[dict, float]:
    """Trace `steps` calls of `run` (after warm-up); (summary, wall ms per call)."""
    for _ in range(3):
        jax.block_until_ready(run())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(steps):
            value = run()
        jax.block_until_ready(value)
        wall = (time.perf_counter() - start) / steps * 1e3
    return summarize_trace(read_trace(trace_dir), steps), wall


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small"],
                        choices=list(bench_train.CONFIGS))
    parser.add_argument("--steps", type=int, default=5,
                        help="calls traced per framework (default 5)")
    bench_train.add_runner_flags(parser)
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="keep the traces here (default: a temporary directory)")
    common.add_malloc_flag(parser)
    args = parser.parse_args(argv)
    bench_train.check_runner_flags(parser, args, counts=("steps",))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # As in bench_train: without it, XLA:CPU's large temporaries are faulted in afresh every
    # step and a profile blames the ops that first write them.
    common.configure_malloc(args.default_malloc)
    header = ["config", "framework", "HLO ops", "device ops/step", "device busy ms/step",
              "device span ms/step", "wall ms/step", "host ms/step, top activities"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.trace_dir or Path(scratch)
        for name in args.configs:
            runners = bench_train.make_runners(bench_train.CONFIGS[name], args)[3]
            for framework, (run, _) in runners.items():
                ops = entry_op_counts(run.lower().compile().as_text())
                slug = re.sub(r"[^a-z0-9]+", "-", f"{name} {framework}".lower()).strip("-")
                summary, wall = profile(run, args.steps, root / slug)
                k = args.steps_per_call
                top = "; ".join(f"{n[:40]} {ms / k:.2f}" for n, ms in summary["host_top"])
                rows.append([name, framework, sum(ops.values()),
                             f"{summary['device_ops'] / k:.0f}",
                             f"{summary['device_busy_ms'] / k:.2f}",
                             f"{summary['device_span_ms'] / k:.2f}", f"{wall / k:.2f}", top])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(f"\n{common.describe_machine()}\n")
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
