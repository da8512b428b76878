"""Attention speed and memory: our implementations side by side with jax.nn and PyTorch.

    python -m benchmarks.bench_attention                       # 128 .. 32768, causal and not
    python benchmarks/bench_attention.py --lengths 1024,8192 --causal --impls blockwise,torch

Each (implementation, length, causal) runs in a fresh subprocess (`attention_case.py`) so that
its peak memory can be read: peak RSS (getrusage ru_maxrss) on CPU, `peak_bytes_in_use` of the
device on GPU/TPU. A run that exceeds --mem-limit-gb or --timeout is reported as OOM / timeout
and longer lengths of that implementation are skipped. Times: jit compile excluded, median of
--repeats calls; with `--rounds N` the implementations of a length run N times over, in turn,
and each row is the median of its N runs (on a host whose speed drifts, e.g. a shared VM).
float32 on CPU, bfloat16 on accelerators. Peers: `jax.nn.dot_product_attention` (its default,
XLA), on a GPU also its cuDNN fused kernel (`cudnn`: implementation="cudnn"), and PyTorch's
`scaled_dot_product_attention` (`torch`; fused flash kernels on CPU and CUDA). Prints a markdown
table, saves a log-log plot and rewrites this program's own section of benchmarks/RESULTS.md.
The plot goes to --out, by default attention.png beside the --results file; with --no-results
nothing is written unless --out is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention_case import GPU_ONLY, calls  # noqa: E402
from benchmarks.common import (  # noqa: E402
    cpu_count,
    describe_machine,
    markdown_table,
    positive_float,
    positive_int,
    positive_int_list,
    today,
    write_results_section,
)

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("vmap", "xla", "dense", "blockwise", "jax.nn", "cudnn", "torch")
DTYPES = ("float32", "bfloat16", "float16")  # names both jax.numpy and torch know


# argparse `type=` for --impls (the numeric flag types live in benchmarks.common)
def impl_list(text: str) -> list[str]:
    """Comma-separated names from IMPLS, duplicates dropped, in the order given."""
    impls = list(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"none in {text!r}"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(IMPLS)}")
    return impls


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(spec: dict, timeout: float, mem_limit: float) -> dict:
    """Run one case in a fresh subprocess, killing it past `timeout` s or `mem_limit` bytes."""
    cmd = [sys.executable, "-m", "benchmarks.attention_case", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start, status = time.monotonic(), None
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            status = "timeout"
        elif mem_limit and _rss_bytes(proc.pid) > mem_limit:
            status = "OOM"
        if status:
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if status:
        return {"status": status}
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    oom = proc.returncode in (-9, 137) or any(
        s in err for s in ("RESOURCE_EXHAUSTED", "MemoryError", "Out of memory"))
    if not oom:
        sys.stderr.write(err[-2000:])
    return {"status": "OOM" if oom else f"error (rc {proc.returncode})"}


def _backend(results: dict, default: str | None = "cpu") -> str | None:
    """The JAX backend the workers ran on ("cpu", "gpu", ...), from the first JAX case that ran;
    `default` until one has."""
    return next((r["backend"] for (impl, _, _), r in results.items()
                 if impl != "torch" and r.get("backend")), default)


def _section_backend(results: dict) -> str:
    """Where the table's cases ran, for its section and memory column: the JAX backend, or
    torch's device in a run of torch alone."""
    return _backend(results, default=None) or next(
        (r["backend"] for r in results.values() if r.get("backend")), "cpu")


def _ms(seconds: float) -> str:
    """Milliseconds, with three decimals below 10 ms (GPU cases take tens of microseconds)."""
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"


def _fmt_time(r):
    return _ms(r["fwd_s"]) if r["status"] == "ok" else r["status"]


def _fmt_mem(r):
    if r["status"] != "ok":
        return "-"
    if r.get("baseline_bytes"):
        return f"{r['peak_bytes'] / 2**20:.0f} ({r['baseline_bytes'] / 2**20:.0f})"
    return f"{r['peak_bytes'] / 2**20:.0f}"


def _ratio(r, peer, key):
    if r["status"] != "ok" or peer is None or peer["status"] != "ok":
        return "-"
    return f"{r[key] / peer[key]:.2f}"


def results_table(results: dict, lengths, impls, causals) -> str:
    mem_name = ("peak RSS MiB (before run)" if _section_backend(results) == "cpu"
                else "peak device MiB")
    with_cudnn = any(i == "cudnn" and r["status"] == "ok" for (i, _, _), r in results.items())
    head = ["causal", "T", "impl", "fwd ms", "fwd+bwd ms", mem_name, "fwd / jax.nn",
            "fwd+bwd / jax.nn"] + (["fwd+bwd / cudnn"] if with_cudnn else []) + ["fwd+bwd / torch"]
    rows = []
    for causal in causals:
        for length in lengths:
            nn, th = results.get(("jax.nn", length, causal)), results.get(("torch", length, causal))
            cu = results.get(("cudnn", length, causal))
            for impl in impls:
                r = results.get((impl, length, causal))
                if r is None or r["status"] == "n/a":
                    continue
                ok = r["status"] == "ok"
                cells = [str(causal), str(length), impl, _fmt_time(r),
                         _ms(r["fwd_bwd_s"]) if ok else "-",
                         _fmt_mem(r),
                         _ratio(r, nn, "fwd_s"), _ratio(r, nn, "fwd_bwd_s")]
                cells += [_ratio(r, cu, "fwd_bwd_s")] if with_cudnn else []
                cells.append(_ratio(r, th, "fwd_bwd_s"))
                rows.append(cells)
    return markdown_table(head, rows)


def save_plot(results: dict, lengths, impls, causals, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(causals), figsize=(6 * len(causals), 4.5), squeeze=False)
    for ax, causal in zip(axes[0], causals):
        for impl in impls:
            pts = [(n, results[(impl, n, causal)]["fwd_bwd_s"]) for n in lengths
                   if results.get((impl, n, causal), {}).get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="fwd+bwd seconds",
               title=f"{'causal' if causal else 'full'} attention")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def merge_rounds(runs: list[dict]) -> dict:
    """One case's result from its rounds: the first failure if a round failed, else the
    median times over the rounds and the largest peak memory."""
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed is not None or len(runs) == 1:
        return failed or runs[0]
    merged = dict(runs[0], rounds=len(runs),
                  peak_bytes=max(r["peak_bytes"] for r in runs),
                  baseline_bytes=min(r["baseline_bytes"] for r in runs))
    for key in ("fwd_s", "fwd_bwd_s"):
        merged[key] = statistics.median(r[key] for r in runs)
    return merged


def run_all(args, lengths, impls, causals, on_length_done=None) -> dict:
    """Every (impl, length, causal) in its own subprocess. The implementations of one length run
    back to back, so that their ratios share the machine's state (other load, temperature);
    with `args.rounds` > 1 they do so round after round, and each case reports the median of
    its rounds (`merge_rounds`): a slow spell of the machine then moves one round's sample,
    not one implementation's row.
    `on_length_done(results)` is called after each length, so a run cut short keeps its rows."""
    results, stopped, last = {}, {}, {}
    for causal in causals:
        for length in lengths:
            if on_length_done is not None and results:
                on_length_done(results)
            runs = {}  # impl -> its results so far at this length
            for round_index in range(args.rounds):
                for impl in impls:
                    key = (impl, causal)
                    if round_index > 0 and (impl not in runs or
                                            runs[impl][-1]["status"] != "ok"):
                        continue  # skipped, n/a or failed in an earlier round
                    backend = _backend(results, default=None)
                    if impl in GPU_ONLY and backend not in (None, "gpu"):
                        results[(impl, length, causal)] = {"status": "n/a"}
                        continue
                    prev = last.get(key)
                    if key not in stopped and prev is not None:
                        # each call ~ (T'/T)^2 x this length's; as many calls as the worker makes
                        scale = (length / prev["T"]) ** 2
                        fwd_calls, fwd_bwd_calls = calls(args.repeats, scale * prev["fwd_s"])
                        estimate = scale * (fwd_calls * prev["fwd_s"]
                                            + fwd_bwd_calls * prev["fwd_bwd_s"])
                        if estimate > args.timeout:
                            stopped[key] = f"est. {estimate:.0f} s > timeout"
                    if key in stopped:
                        results[(impl, length, causal)] = {"status": f"skip ({stopped[key]})"}
                        print(f"causal={causal!s:5} T={length:6} {impl:9}: skip", flush=True)
                        continue
                    spec = dict(impl=impl, length=length, causal=causal, batch=args.batch,
                                heads=args.heads, head_dim=args.head_dim, repeats=args.repeats,
                                block_size=args.block_size, dtype=args.dtype, backend=backend)
                    r = run_case(spec, args.timeout, args.mem_limit_gb * 2**30)
                    runs.setdefault(impl, []).append(r)
                    results[(impl, length, causal)] = r  # the rounds' merge replaces it below
                    shown = (f"fwd {_ms(r['fwd_s'])} ms, fwd+bwd {_ms(r['fwd_bwd_s'])} ms, "
                             f"peak {r['peak_bytes'] / 2**20:.0f} MiB" if r["status"] == "ok"
                             else r["status"])
                    which = f" (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else ""
                    print(f"causal={causal!s:5} T={length:6} {impl:9}: {shown}{which}",
                          flush=True)
            for impl, impl_runs in runs.items():
                key, r = (impl, causal), merge_rounds(impl_runs)
                results[(impl, length, causal)] = r
                if r["status"] in ("OOM", "timeout") or r["status"].startswith("error"):
                    stopped[key] = f"{r['status'].split(' ')[0]} at {length}"
                elif r["status"] == "ok":
                    last[key] = dict(r, T=length)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-len", type=positive_int, default=128,
                   help="shortest length (128); lengths double up to --max-len")
    p.add_argument("--max-len", type=positive_int, default=32768, help="longest length (32768)")
    p.add_argument("--lengths", type=positive_int_list,
                   help="comma-separated lengths (overrides --min-len/--max-len)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="only causal (--causal) or only full (--no-causal); default both")
    p.add_argument("--impls", type=impl_list, default=",".join(IMPLS),
                   help=f"comma-separated, from {', '.join(IMPLS)} (default: all)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="run each length's implementations this many times over, in turn, "
                        "and report each one's median (1): ratios that a slow spell of the "
                        "machine moves less")
    p.add_argument("--block-size", type=positive_int, default=512)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="seconds per subprocess; longer lengths whose estimate exceeds it skip")
    p.add_argument("--mem-limit-gb", type=positive_float, default=12.0,
                   help="RSS cap per subprocess")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"),
                   help="the markdown file whose bench_attention section is rewritten "
                        "(default: benchmarks/RESULTS.md)")
    p.add_argument("--no-results", action="store_true",
                   help="do not touch the --results file; no plot either unless --out is given")
    p.add_argument("--out", default=None,
                   help="where the plot goes (default: attention.png beside the --results "
                        "file; none with --no-results)")
    args = p.parse_args(argv)
    if args.lengths is None and args.min_len > args.max_len:
        p.error(f"argument --min-len: {args.min_len} is greater than --max-len {args.max_len}")
    if args.out is None and not args.no_results:
        args.out = str(Path(args.results).with_name("attention.png"))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.lengths:
        lengths = sorted(set(args.lengths))
    else:
        lengths, n = [], args.min_len
        while n <= args.max_len:
            lengths, n = lengths + [n], 2 * n
    impls = args.impls
    if "torch" in impls and importlib.util.find_spec("torch") is None:
        if impls == ["torch"]:
            raise SystemExit("error: --impls torch, but torch is not installed: "
                             "pip install -e .[bench]")
        print("torch not installed: pip install -e .[bench] to include it", file=sys.stderr)
        impls = [i for i in impls if i != "torch"]
    causals = [False, True] if args.causal is None else [args.causal]
    load_start = os.getloadavg()[0]

    def report(results, final: bool) -> None:
        """Print (when final) and write the table of the results so far."""
        body = report_body(args, results, lengths, impls, causals, load_start)
        if final:
            print("\n" + body)
        if (args.out is not None and save_plot(results, lengths, impls, causals, Path(args.out))
                and final):
            print(f"\nplot: {args.out}")
        if not args.no_results:
            path = write_results_section(f"bench_attention ({_section_backend(results)})", body,
                                         args.results)
            if final:
                print(f"results: {path}")

    results = run_all(args, lengths, impls, causals,
                      on_length_done=lambda results: report(results, final=False))
    report(results, final=True)


def report_body(args, results, lengths, impls, causals, load_start) -> str:
    """The RESULTS.md section: machine, command, shapes, and the table."""
    load_end = os.getloadavg()[0]
    table = results_table(results, lengths, impls, causals)
    # the driver never starts JAX (on a GPU it would hold the memory the workers measure)
    machine = describe_machine(next((r["jax"] for r in results.values() if r.get("jax")),
                                    "JAX: no case ran"))
    backend = _backend(results)
    dtype = next((r["dtype"] for r in results.values() if r.get("dtype")), args.dtype)
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    command = " ".join(["python", *map(shlex.quote, argv[1:])])
    return "\n".join([
        f"- machine: {machine}",
        f"- date: {today()}",
        f"- command: `{command}`",
        f"- 1-minute load average at start / end: {load_start:.1f} / {load_end:.1f} "
        f"({cpu_count()} cores; other jobs inflate absolute times, ratios are taken between "
        "runs of one length, back to back"
        + (f", and each time is the median of {args.rounds} such rounds)" if args.rounds > 1
           else ")"),
        f"- shapes: batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, {dtype}; "
        f"blockwise block_size {args.block_size} (query blocks {args.block_size}, key blocks "
        f"{max(args.block_size // 2, 1)})",
        "- times in ms (jit compile excluded, median); ratios are time / peer time "
        "(< 1 = faster than the peer); memory: "
        + ("peak RSS of the whole process (a fresh one per row and round, the largest of the "
           "rounds; in brackets its peak before the first call: runtime + inputs)"
           if backend == "cpu" else
           "the device allocator's peak bytes in use (a fresh process per row and round, the "
           "largest of the rounds; inputs included)"),
        "",
        table,
    ])


if __name__ == "__main__":
    main()
