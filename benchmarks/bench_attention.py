"""Attention speed and memory: our implementations side by side with jax.nn and PyTorch.

    python -m benchmarks.bench_attention                       # 128 .. 32768, causal and not
    python benchmarks/bench_attention.py --lengths 1024,8192 --causal --impls blockwise,torch

Each (implementation, length, causal) runs in a fresh subprocess so that its peak memory can be
read: peak RSS (getrusage ru_maxrss) on CPU, `peak_bytes_in_use` of the device on GPU/TPU.
A run that exceeds --mem-limit-gb or --timeout is reported as OOM / timeout and longer lengths of
that implementation are skipped. Times: jit compile excluded, median of --repeats calls.
float32 on CPU, bfloat16 on accelerators. Peers: `jax.nn.dot_product_attention` (its default,
XLA), on a GPU also its cuDNN fused kernel (`cudnn`: implementation="cudnn"), and PyTorch's
`scaled_dot_product_attention` (`torch`; fused flash kernels on CPU and CUDA). Prints a markdown
table, saves a log-log plot and rewrites this program's own section of benchmarks/RESULTS.md.
The plot goes to --out, by default attention.png beside the --results file; with --no-results
nothing is written unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    cpu_count,
    describe_jax,
    describe_machine,
    markdown_table,
    positive_float,
    positive_int,
    positive_int_list,
    time_fn,
    today,
    write_results_section,
)

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("vmap", "xla", "dense", "blockwise", "jax.nn", "cudnn", "torch")
GPU_ONLY = {"cudnn"}  # elsewhere such a case reports "n/a" and is left out of the table
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


# ----------------------------------------------------------------------------- worker side
def _jax_case(impl, q, k, v, causal, block_size):
    import jax

    if impl in ("jax.nn", "cudnn"):
        def attend(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation="cudnn" if impl == "cudnn" else None)
    else:
        from flax_transformer.kernels import multi_head_attention

        def attend(q, k, v):
            return multi_head_attention(q, k, v, causal=causal, implementation=impl,
                                        block_size=block_size)

    def forward_backward(q, k, v, cotangent):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(cotangent)

    return jax.jit(attend), jax.jit(forward_backward)


def _torch_case(arrays, causal, device, dtype):
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype)
    tq, tk, tv, ct = (torch.from_numpy(x).to(device, dtype).transpose(1, 2).contiguous()
                      for x in arrays)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(q, k, v):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        sync()
        return out

    def forward_backward(q, k, v, cotangent):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(cotangent)
        sync()
        return out, (q.grad, k.grad, v.grad)

    return forward, forward_backward, (tq, tk, tv), ct


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_worker(spec: dict) -> dict:
    """Time one (impl, length, causal) case in this process; returns a result record.

    The torch worker never imports JAX (and the JAX workers never import torch), so that each
    peak RSS is one framework's own."""
    import numpy as np

    shape = (spec["batch"], spec["length"], spec["heads"], spec["head_dim"])
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    if spec["impl"] == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = "gpu" if device == "cuda" else "cpu"
        if spec.get("backend") not in (None, backend):
            return {"status": "n/a"}  # e.g. JAX on a GPU but a CPU-only torch
        dtype = spec["dtype"] or ("float32" if device == "cpu" else "bfloat16")
        forward, forward_backward, args, ct = _torch_case(arrays, spec["causal"], device, dtype)
    else:
        import jax
        import jax.numpy as jnp

        backend = jax.default_backend()
        if spec["impl"] in GPU_ONLY and backend != "gpu":
            return {"status": "n/a"}
        dtype = spec["dtype"] or ("float32" if backend == "cpu" else "bfloat16")
        q, k, v, ct = (jnp.asarray(x, dtype) for x in arrays)
        forward, forward_backward = _jax_case(spec["impl"], q, k, v, spec["causal"],
                                              spec["block_size"])
        args = (q, k, v)
    del arrays
    baseline = _peak_rss()
    repeats = spec["repeats"]
    fwd = time_fn(forward, *args, repeats=1, warmup=1)
    if fwd > 5.0:  # long cases: one timed call each, their noise is small
        repeats = 1
    else:
        fwd = time_fn(forward, *args, repeats=repeats, warmup=0)
    fwd_bwd = time_fn(forward_backward, *args, ct, repeats=repeats, warmup=1)
    if backend == "cpu":
        peak = _peak_rss()
    elif spec["impl"] == "torch":
        import torch

        peak = torch.cuda.max_memory_allocated()
    else:
        peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
    return {"status": "ok", "fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "peak_bytes": peak,
            "baseline_bytes": baseline if backend == "cpu" else 0, "repeats": repeats,
            "dtype": dtype, "backend": backend,
            "jax": None if spec["impl"] == "torch" else describe_jax()}


# ----------------------------------------------------------------------------- driver side
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
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--worker", json.dumps(spec)]
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
    mem_name = "peak RSS MiB (before run)" if _backend(results) == "cpu" else "peak device MiB"
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


def run_all(args, lengths, impls, causals, on_length_done=None) -> dict:
    """Every (impl, length, causal) in its own subprocess. The implementations of one length run
    back to back, so that their ratios share the machine's state (other load, temperature).
    `on_length_done(results)` is called after each length, so a run cut short keeps its rows."""
    results, stopped, last = {}, {}, {}
    for causal in causals:
        for length in lengths:
            if on_length_done is not None and results:
                on_length_done(results)
            for impl in impls:
                key = (impl, causal)
                backend = _backend(results, default=None)
                if impl in GPU_ONLY and backend not in (None, "gpu"):
                    results[(impl, length, causal)] = {"status": "n/a"}
                    continue
                prev = last.get(key)
                if key not in stopped and prev is not None:
                    # next case ~ (T'/T)^2 x (1 warm-up + 1 timed call of fwd and of fwd+bwd)
                    estimate = 2 * (prev["fwd_s"] + prev["fwd_bwd_s"]) * (length / prev["T"]) ** 2
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
                results[(impl, length, causal)] = r
                shown = (f"fwd {_ms(r['fwd_s'])} ms, fwd+bwd {_ms(r['fwd_bwd_s'])} ms, "
                         f"peak {r['peak_bytes'] / 2**20:.0f} MiB" if r["status"] == "ok"
                         else r["status"])
                print(f"causal={causal!s:5} T={length:6} {impl:9}: {shown}", flush=True)
                if r["status"] in ("OOM", "timeout") or r["status"].startswith("error"):
                    stopped[key] = f"{r['status'].split(' ')[0]} at {length}"
                elif r["status"] == "ok":
                    last[key] = dict(r, T=length)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
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
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    if args.lengths:
        lengths = sorted(set(args.lengths))
    else:
        lengths, n = [], args.min_len
        while n <= args.max_len:
            lengths, n = lengths + [n], 2 * n
    impls = args.impls
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
            path = write_results_section(f"bench_attention ({_backend(results)})", body,
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
    command = " ".join(["python"] + argv[1:])
    return "\n".join([
        f"- machine: {machine}",
        f"- date: {today()}",
        f"- command: `{command}`",
        f"- 1-minute load average at start / end: {load_start:.1f} / {load_end:.1f} "
        f"({cpu_count()} cores; other jobs inflate absolute times, ratios are taken between "
        "runs of one length, back to back)",
        f"- shapes: batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, {dtype}; "
        f"blockwise block_size {args.block_size} (query blocks {args.block_size}, key blocks "
        f"{max(args.block_size // 2, 1)})",
        "- times in ms (jit compile excluded, median); ratios are time / peer time "
        "(< 1 = faster than the peer); memory: "
        + ("peak RSS of the whole process (a fresh one per row; in brackets its peak before "
           "the first call: runtime + inputs)" if backend == "cpu" else
           "the device allocator's peak bytes in use (a fresh process per row; inputs "
           "included)"),
        "",
        table,
    ])


if __name__ == "__main__":
    main()
