"""The benchmarks' building blocks: peers have our architecture, FLOP counts are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.bench_train import compute_dtype
from benchmarks.flops import forward_flops, measured_peak_flops, train_step_flops
from benchmarks.peer_flax import FlaxPeerTransformer
from flax_transformer import Transformer, TransformerConfig

TINY = TransformerConfig.preset("tiny", dropout_rate=0.1, tie_output=True)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_flax_peer_has_our_architecture_and_parameter_count():
    ours = Transformer(TINY, rngs=nnx.Rngs(0))
    peer = FlaxPeerTransformer(TINY, rngs=nnx.Rngs(0))
    assert n_params(peer) == n_params(ours)
    src = jnp.full((2, 5), 5, jnp.int32)
    tgt = jnp.full((2, 4), 6, jnp.int32)
    assert peer(src, tgt).shape == ours(src, tgt).shape == (2, 4, TINY.tgt_vocab_size)


def test_torch_peer_has_our_parameter_count():
    pytest.importorskip("torch")
    from benchmarks.peer_torch import build_torch_step

    step, count = build_torch_step(TINY, batch=2, src_len=5, tgt_len=4)
    ours = Transformer(TINY.replace(share_embeddings=False), rngs=nnx.Rngs(0))
    # nn.Transformer adds a final LayerNorm to each stack (2 x 2 x d_model parameters).
    assert count == n_params(ours) + 4 * TINY.d_model
    assert np.isfinite(step().item())


def test_torch_peer_runs_bf16_under_autocast():
    pytest.importorskip("torch")
    from benchmarks.peer_torch import build_torch_step

    step, _ = build_torch_step(TINY.replace(dtype="bfloat16"), batch=2, src_len=5, tgt_len=4)
    assert np.isfinite(step().item())


def test_compute_dtype_and_peak_per_dtype():
    assert compute_dtype("bfloat16") == "bfloat16"
    assert compute_dtype("float32") == "float32"
    assert compute_dtype("auto") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    for dtype in (jnp.float32, jnp.bfloat16):
        assert measured_peak_flops(dtype, n=64, repeats=2) > 0


def test_forward_flops_by_hand():
    c = TransformerConfig.preset("tiny", num_encoder_layers=1, num_decoder_layers=1,
                                 d_model=8, num_heads=2, d_ff=16, tgt_vocab_size=10)
    s, t, d, f = 3, 2, 8, 16
    encoder = s * (8 * d * d + 4 * d * f) + 4 * s * s * d
    decoder = t * (8 * d * d + 4 * d * f) + 4 * t * t * d + 4 * t * d * d + 4 * s * d * d \
        + 4 * t * s * d
    assert forward_flops(c, s, t) == encoder + decoder + 2 * t * d * 10
    assert train_step_flops(c, 4, s, t) == 3 * 4 * forward_flops(c, s, t)


def test_bench_attention_keeps_finished_lengths_when_cut_short(tmp_path, monkeypatch):
    from benchmarks import bench_attention

    calls = []

    def fake_case(spec, timeout, mem_limit):
        calls.append((spec["impl"], spec["length"]))
        if spec["length"] == 256:
            raise KeyboardInterrupt  # the run is killed during the second length
        seconds = {"blockwise": 0.5, "jax.nn": 1.0}[spec["impl"]]
        return {"status": "ok", "fwd_s": seconds, "fwd_bwd_s": 3 * seconds, "peak_bytes": 2**20,
                "baseline_bytes": 0, "repeats": 1, "dtype": "float32", "backend": "cpu",
                "jax": "JAX (test) on cpu"}

    monkeypatch.setattr(bench_attention, "run_case", fake_case)
    results = tmp_path / "RESULTS.md"
    with pytest.raises(KeyboardInterrupt):
        bench_attention.main(["--lengths", "128,256", "--causal", "--impls",
                              "blockwise,cudnn,jax.nn", "--results", str(results),
                              "--out", str(tmp_path / "plot.png")])
    text = results.read_text()
    assert "## bench_attention (cpu)" in text and "JAX (test) on cpu" in text
    assert "| True | 128 | blockwise | 500.0 | 1500.0 | 1 | 0.50 | 0.50 | - |" in text
    assert "| True | 128 | jax.nn |" in text and "| 256 |" not in text
    # cudnn is GPU-only: on a CPU backend it never runs and has no row or ratio column
    assert ("cudnn", 128) not in calls and "cudnn" not in text


def test_torch_peer_refuses_cuda_it_does_not_have(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    import json

    from benchmarks.peer_torch import main

    with pytest.raises(SystemExit, match="sees no CUDA device"):
        main(["--config", json.dumps(TINY.to_dict()), "--batch", "2", "--length", "4",
              "--device", "cuda"])


def test_torch_peer_worker_reports_per_step_seconds(capsys):
    pytest.importorskip("torch")
    import json

    from benchmarks.peer_torch import main

    main(["--config", json.dumps(TINY.to_dict()), "--batch", "2", "--length", "4", "--steps", "2",
          "--repeats", "3"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["seconds"]) == 3 and all(s > 0 for s in report["seconds"])
    assert all(0 < h <= s for h, s in zip(report["host_seconds"], report["seconds"]))
    assert report["device"] == "cpu" and report["params"] > 0


def test_accelerator_suite_commands_parse():
    """Every command of benchmarks/accelerator_suite.sh is accepted by its program's parser."""
    import shlex
    from pathlib import Path

    from benchmarks import bench_attention, bench_train

    parsers = {"benchmarks.bench_train": bench_train.parse_args,
               "benchmarks.bench_attention": bench_attention.parse_args}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator_suite.sh"
    commands = [shlex.split(line.split("||")[0]) for line in script.read_text().splitlines()
                if line.startswith("$PYTHON -m ")]
    assert {c[2] for c in commands} == set(parsers)
    for command in commands:
        parsers[command[2]](command[3:])  # SystemExit (argparse) on an unknown or bad flag


def test_time_steps_reports_total_and_host_time_per_step():
    from benchmarks.bench_train import time_steps

    calls = []

    def run():
        calls.append(1)
        return jnp.ones(4) * len(calls)

    total, host = time_steps(run, 3)
    assert len(calls) == 3 and 0 < host <= total


@pytest.mark.parametrize("flag", ["--steps", "--repeats", "--batch"])
def test_bench_train_refuses_non_positive_counts(flag, capsys):
    from benchmarks.bench_train import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_bench_train_uses_the_best_peak_of_the_run(monkeypatch, capsys):
    """MFU divides by the best of the peak measurements (before and after each config): one
    taken while the machine is busy would inflate every MFU of the run."""
    from benchmarks import bench_train

    peaks = iter([100e9, 200e9, 150e9])
    monkeypatch.setattr(bench_train, "measured_peak_flops", lambda dtype: next(peaks))

    def fake_config(name, spec, args):
        return [dict(config=name, batch=2, framework=framework, params=1e6, flops=1e9, tokens=64,
                     seconds=seconds, host_seconds=0.001, vs_fastest_peer=0.1 / seconds)
                for framework, seconds in (("flax_transformer", 0.05), ("peer", 0.1))]

    monkeypatch.setattr(bench_train, "bench_config", fake_config)
    bench_train.main(["--configs", "small", "base", "--no-write"])
    out = capsys.readouterr().out
    assert "matmul peak: 200.0 GFLOP/s (best of 3 measurements" in out
    # 1 GFLOP in 50 ms = 20 GFLOP/s: 10% of the best peak (20% of the first measurement)
    table = out[out.index("| config |"):]
    assert table.count("| flax_transformer |") == 2 and "| 10.0% |" in table
    assert "| 20.0% |" not in table and "| 2.00x |" in table
