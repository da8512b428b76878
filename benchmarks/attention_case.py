"""One case of `bench_attention`, timed in this process:

    python -m benchmarks.attention_case '{"impl": "blockwise", "length": 8192, ...}'

prints `RESULT {json}`: forward and forward+backward seconds and the peak memory of one
(implementation, length, causal) case. `bench_attention` starts one such process per case, so
that each peak is one case's own; the torch case never imports JAX (nor a JAX case torch).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_jax, time_fn  # noqa: E402

GPU_ONLY = {"cudnn"}  # elsewhere such a case reports "n/a" and is left out of the table


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


LONG_CASE_S = 5.0  # a case whose forward takes longer is timed once per pass


def calls(repeats: int, fwd_s: float) -> tuple[int, int]:
    """(forward calls, forward+backward calls) of a case whose forward takes `fwd_s`, warm-up
    calls included: what `run_worker` makes."""
    return (2, 2) if fwd_s > LONG_CASE_S else (2 + repeats, 1 + repeats)


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
    if fwd > LONG_CASE_S:  # long cases: one timed call each, their noise is small
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


if __name__ == "__main__":
    print("RESULT " + json.dumps(run_worker(json.loads(sys.argv[1]))), flush=True)
