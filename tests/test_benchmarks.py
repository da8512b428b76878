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


def case_result(fwd_s: float, fwd_bwd_s: float, **changes) -> dict:
    """What `bench_attention.run_case` returns for a case that ran (a CPU JAX case unless
    `changes` say otherwise)."""
    return {"status": "ok", "fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s, "peak_bytes": 2**20,
            "baseline_bytes": 0, "repeats": 1, "dtype": "float32", "backend": "cpu",
            "jax": "JAX (test) on cpu", **changes}


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
    assert count == n_params(ours)  # nn.Transformer's final LayerNorms removed (post-norm)
    assert np.isfinite(step().item())


def test_torch_peer_drops_out_where_ours_does():
    """Dropout on sub-layer outputs and embeddings only: in eval mode the peer is a
    deterministic function, and in train mode no attention weights or feed-forward hidden
    units are dropped (their modules are identities or rate 0)."""
    torch = pytest.importorskip("torch")
    from benchmarks import peer_torch

    built = {}
    real = torch.nn.Transformer

    def keep(*args, **kwargs):
        built["model"] = real(*args, **kwargs)
        return built["model"]

    monkey = pytest.MonkeyPatch()
    monkey.setattr(torch.nn, "Transformer", keep)
    try:
        peer_torch.build_torch_step(TINY, batch=2, src_len=5, tgt_len=4)
    finally:
        monkey.undo()
    model = built["model"]
    assert model.encoder.norm is None and model.decoder.norm is None
    layers = [*model.encoder.layers, *model.decoder.layers]
    assert all(isinstance(layer.dropout, torch.nn.Identity) for layer in layers)
    assert all(layer.self_attn.dropout == 0.0 for layer in layers)
    assert all(layer.multihead_attn.dropout == 0.0 for layer in model.decoder.layers)
    assert all(layer.norm1.eps == TINY.layer_norm_epsilon for layer in layers)


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
        assert measured_peak_flops(dtype, shapes=[(64, 32, 16)], repeats=2) > 0


def test_measured_peak_is_the_best_over_its_shapes(monkeypatch):
    from benchmarks import flops

    assert flops.matmul_flops_per_second(32, 16, 8, repeats=1) > 0  # the real measurement
    speeds = {(8, 8, 8): 3.0, (16, 8, 4): 7.0, (4, 4, 4): 5.0}
    monkeypatch.setattr(flops, "matmul_flops_per_second",
                        lambda m, k, n, dtype, repeats: speeds[m, k, n])
    assert flops.measured_peak_flops(shapes=list(speeds)) == 7.0
    with pytest.raises(ValueError, match="at least one"):
        flops.measured_peak_flops(shapes=[])


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
        return case_result(seconds, 3 * seconds)

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


def test_bench_attention_rounds_interleave_and_report_medians(monkeypatch, capsys):
    """--rounds 3: each length's implementations run in turn three times; a row holds each
    one's median (a slow spell in one round moves nothing), and a case that fails in a round
    is reported failed and not run again."""
    from benchmarks import bench_attention

    calls = []
    fwd = {("blockwise", 128): [0.5, 0.6, 5.0], ("jax.nn", 128): [1.0, 1.1, 0.9],
           ("blockwise", 256): [2.0, 2.2, 2.1], ("jax.nn", 256): [4.0, None, 4.0]}

    def fake_case(spec, timeout, mem_limit):
        case = (spec["impl"], spec["length"])
        calls.append(case)
        seconds = fwd[case][sum(c == case for c in calls) - 1]
        if seconds is None:
            return {"status": "OOM"}
        return case_result(seconds, 3 * seconds, peak_bytes=2**20 * len(calls))

    monkeypatch.setattr(bench_attention, "run_case", fake_case)
    bench_attention.main(["--lengths", "128,256", "--causal", "--impls", "blockwise,jax.nn",
                          "--rounds", "3", "--no-results"])
    assert calls == [("blockwise", 128), ("jax.nn", 128)] * 3 + [
        ("blockwise", 256), ("jax.nn", 256), ("blockwise", 256), ("jax.nn", 256),
        ("blockwise", 256)]
    out = capsys.readouterr().out
    assert "T=   128 blockwise: fwd 5000.0 ms, fwd+bwd 15000.0 ms, peak 5 MiB (round 3/3)" in out
    # medians: blockwise 0.6 s, jax.nn 1.0 s; the peak is the largest of the rounds' (5 MiB)
    assert "| True | 128 | blockwise | 600.0 | 1800.0 | 5 | 0.60 | 0.60 | - |" in out
    assert "| True | 128 | jax.nn | 1000.0 | 3000.0 |" in out
    assert "| True | 256 | blockwise | 2100.0 |" in out and "| True | 256 | jax.nn | OOM |" in out
    assert "the median of 3 such rounds" in out


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


def test_torch_peer_serves_one_timed_block_per_request(monkeypatch, capsys):
    """--serve: a line once warm (params, no times), then one block's times per stdin line,
    until stdin closes."""
    pytest.importorskip("torch")
    import io
    import json

    from benchmarks.peer_torch import main

    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))
    main(["--config", json.dumps(TINY.to_dict()), "--batch", "2", "--length", "4", "--steps", "2",
          "--serve"])
    ready, *replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ready["params"] > 0 and ready["device"] == "cpu" and "seconds" not in ready
    assert len(replies) == 2
    assert all(0 < r["host_seconds"] <= r["seconds"] for r in replies)


def test_bench_train_times_torch_in_turn_with_the_jax_frameworks(monkeypatch):
    """Each round times every framework once, torch after the JAX ones; torch's median is
    its row, and its child is closed even when a block fails."""
    from benchmarks import bench_train

    order = []

    def fake_runners(spec, args):
        runners = {name: (lambda name=name: order.append(name) or jnp.zeros(()), 10)
                   for name in ("ours", "flax")}
        return TINY, 2, 4, runners

    class FakeTorch:
        params, closed, seconds = 11, False, iter([0.3, 0.1, 0.2])

        def block(self):
            order.append("torch")
            return next(self.seconds), 0.001

        def close(self):
            FakeTorch.closed = True

    monkeypatch.setattr(bench_train, "make_runners", fake_runners)
    monkeypatch.setattr(bench_train, "start_torch_peer", lambda *a: FakeTorch())
    args = bench_train.parse_args(["--configs", "small", "--steps", "1", "--repeats", "3"])
    results = bench_train.bench_config("small", bench_train.CONFIGS["small"], args)
    assert order == ["ours", "ours", "flax", "flax"] + ["ours", "flax", "torch"] * 3  # warm-up
    torch_row = next(r for r in results if r["framework"] == bench_train.TORCH)
    assert torch_row["seconds"] == 0.2 and torch_row["params"] == 11 and FakeTorch.closed

    FakeTorch.closed, FakeTorch.seconds = False, iter([])  # StopIteration in the first block
    with pytest.raises(StopIteration):
        bench_train.bench_config("small", bench_train.CONFIGS["small"], args)
    assert FakeTorch.closed


def test_torch_peer_child_without_torch_gives_the_install_hint(tmp_path, capsys):
    """The child's import error, read from its stderr, becomes the install hint and no torch
    row (a stand-in `torch` module that fails to import, so this runs with or without torch)."""
    import os

    from benchmarks import bench_train

    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    args = bench_train.parse_args(["--steps", "1"])
    args.child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    assert bench_train.start_torch_peer(TINY, 2, 4, args) is None
    assert "torch not installed: pip install -e .[bench]" in capsys.readouterr().err
    (tmp_path / "torch.py").write_text("raise RuntimeError('broken build')\n")
    with pytest.raises(RuntimeError, match="(?s)torch peer failed:.*broken build"):
        bench_train.start_torch_peer(TINY, 2, 4, args)


def test_torch_peer_child_that_dies_mid_run_is_reported_with_its_stderr(tmp_path, monkeypatch):
    """A child that exits after its first block: the next block raises with the child's
    stderr, and closing it afterwards raises nothing (a stand-in child speaking the protocol)."""
    import os

    from benchmarks import bench_train

    (tmp_path / "dying_peer.py").write_text(
        "import json, sys\n"
        "print(json.dumps({'params': 7}), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(json.dumps({'seconds': 0.5, 'host_seconds': 0.1}), flush=True)\n"
        "sys.stdin.readline()\n"
        "sys.exit('out of memory, say')\n")
    monkeypatch.setattr(bench_train.TorchPeer, "module", "dying_peer")
    args = bench_train.parse_args(["--steps", "1"])
    args.child_env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    peer = bench_train.TorchPeer(TINY, 2, 4, args)
    assert peer.params == 7 and peer.block() == (0.5, 0.1)
    with pytest.raises(bench_train.TorchPeerError, match="out of memory, say"):
        peer.block()
    peer.close()
    assert peer.process.returncode == 1
    # one that exits without reading: the request meets a closed pipe or no reply, alike
    (tmp_path / "dying_peer.py").write_text(
        "import json, sys\nprint(json.dumps({'params': 7}), flush=True)\nsys.exit('gone')\n")
    peer = bench_train.TorchPeer(TINY, 2, 4, args)
    peer.process.wait()
    with pytest.raises(bench_train.TorchPeerError, match="gone"):
        peer.block()
    peer.close()


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


@pytest.mark.parametrize("flag", ["--steps", "--repeats", "--batch", "--steps-per-call"])
def test_bench_train_refuses_non_positive_counts(flag, capsys):
    from benchmarks.bench_train import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_bench_train_times_several_attention_implementations_side_by_side(capsys):
    from benchmarks.bench_train import OURS, ours_name, parse_args

    args = parse_args(["--attention-impl", "dense", "xla"])
    assert args.attention_impl == ["dense", "xla"]
    assert [ours_name(i, args.attention_impl) for i in args.attention_impl] == [
        f"{OURS} (dense)", f"{OURS} (xla)"]
    assert ours_name("dense", ["dense"]) == OURS  # one implementation: the plain row name
    with pytest.raises(SystemExit):
        parse_args(["--attention-impl", "xla", "xla"])
    assert "lists an implementation twice" in capsys.readouterr().err


def test_repeat_steps_equals_as_many_single_steps():
    """--steps-per-call K: one jitted call of K scanned steps gives the state K calls of one
    step give (ours and the Flax peer), so its per-step times measure the same work."""
    from benchmarks.bench_train import ours_step, peer_step

    config = TransformerConfig.preset("tiny", src_vocab_size=40, tgt_vocab_size=40,
                                      dropout_rate=0.1, max_len=8, num_encoder_layers=1,
                                      num_decoder_layers=1)  # compiles faster
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(4, 40, (2, 8)), jnp.int32)
    tgt = jnp.asarray(rng.integers(4, 40, (2, 9)), jnp.int32)
    for make in (ours_step, peer_step):
        single, _ = make(config, src, tgt[:, :-1], tgt[:, 1:])
        scanned, _ = make(config, src, tgt[:, :-1], tgt[:, 1:], steps_per_call=3)
        losses = [float(single()) for _ in range(6)]  # steps 1..6, each its loss
        # one call runs three steps and returns the last one's loss: steps 3 and 6
        np.testing.assert_allclose([float(scanned()), float(scanned())],
                                   [losses[2], losses[5]], rtol=2e-5)
        assert len(set(losses)) == 6  # each step starts from a new state


def test_bench_train_uses_the_best_peak_of_the_run(monkeypatch, capsys):
    """MFU divides by the best of the peak measurements (before and after each config): one
    taken while the machine is busy would inflate every MFU of the run."""
    import datetime

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
    assert f"Date: {datetime.date.today().isoformat()}; command: `python -m" in out
    # 1 GFLOP in 50 ms = 20 GFLOP/s: 10% of the best peak (20% of the first measurement)
    table = out[out.index("| config |"):]
    assert table.count("| flax_transformer |") == 2 and "| 10.0% |" in table
    assert "| 20.0% |" not in table and "| 2.00x |" in table


@pytest.mark.parametrize("flag, value", [
    ("--min-len", "0"), ("--min-len", "-8"), ("--min-len", "abc"), ("--max-len", "0"),
    ("--lengths", "abc"), ("--lengths", "128,0"), ("--lengths", ","), ("--batch", "0"),
    ("--heads", "0"), ("--head-dim", "-1"), ("--repeats", "0"), ("--rounds", "0"),
    ("--block-size", "0"),
    ("--timeout", "0"), ("--timeout", "nan"), ("--mem-limit-gb", "-1"), ("--impls", "nope"),
    ("--impls", ","), ("--dtype", "int8"),
])
def test_bench_attention_refuses_bad_values_naming_the_flag(flag, value, capsys):
    """A usage error (exit 2) instead of a traceback, an endless loop (--min-len 0) or an empty
    table."""
    from benchmarks.bench_attention import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value, "--no-results"])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: " in capsys.readouterr().err


def test_bench_attention_refuses_min_len_above_max_len(capsys):
    from benchmarks.bench_attention import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--min-len", "256", "--max-len", "128"])
    assert exit_info.value.code == 2
    assert "error: argument --min-len: 256 is greater than --max-len 128" in capsys.readouterr().err
    # --lengths overrides the range, which is then not checked
    assert parse_args(["--min-len", "256", "--max-len", "128", "--lengths", "64"]).lengths == [64]


def test_bench_attention_parses_lists():
    from benchmarks.bench_attention import IMPLS, parse_args

    args = parse_args(["--lengths", "1024, 256", "--impls", "torch,blockwise,torch"])
    assert args.lengths == [1024, 256] and args.impls == ["torch", "blockwise"]
    assert parse_args([]).impls == list(IMPLS)


def test_bench_attention_plot_goes_beside_the_results_file(tmp_path):
    """The committed plot benchmarks/attention.png is rewritten only with RESULTS.md: with
    --no-results there is no plot unless --out names one."""
    from benchmarks.bench_attention import REPO, parse_args

    assert parse_args([]).out == str(REPO / "benchmarks" / "attention.png")
    assert parse_args(["--no-results"]).out is None
    assert parse_args(["--results", str(tmp_path / "R.md")]).out == str(tmp_path / "attention.png")
    out = str(tmp_path / "plot.png")
    assert parse_args(["--no-results", "--out", out]).out == out


def test_bench_attention_no_results_writes_no_plot(monkeypatch, capsys):
    from benchmarks import bench_attention

    def fake_case(spec, timeout, mem_limit):
        return case_result(0.1, 0.3)

    plots, sections = [], []
    monkeypatch.setattr(bench_attention, "run_case", fake_case)
    monkeypatch.setattr(bench_attention, "save_plot", lambda *a: plots.append(a[-1]) or True)
    monkeypatch.setattr(bench_attention, "write_results_section", lambda *a: sections.append(a))
    bench_attention.main(["--lengths", "128,256", "--impls", "blockwise", "--no-results"])
    assert plots == [] and sections == []
    assert "| 128 | blockwise |" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [
    ("--batch", "a"), ("--batch", "0"), ("--batch", "1,-4"), ("--preset", "nope"),
    ("--repeats", "0"), ("--new-tokens", "0"), ("--src-len", "0"), ("--src-len", "x"),
])
def test_bench_decode_refuses_bad_values_naming_the_flag(flag, value, capsys):
    from benchmarks.bench_decode import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value, "--no-write"])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: " in capsys.readouterr().err


def test_bench_decode_parses_its_flags():
    from benchmarks.bench_decode import parse_args

    args = parse_args(["--batch", "4,1", "--preset", "tiny", "--new-tokens", "8"])
    assert args.batch == [4, 1] and args.preset == "tiny" and args.new_tokens == 8
    assert parse_args([]).batch == [1, 4]


@pytest.mark.parametrize("flag, value", [
    ("--batch", "0"), ("--src-len", "x"), ("--new-tokens", "0"), ("--beam-size", "-1"),
    ("--repeats", "0"), ("--fake-cpu-devices", "0"),
])
def test_bench_decode_devices_refuses_bad_values_naming_the_flag(flag, value, capsys):
    from benchmarks.bench_decode_devices import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value, "--no-write"])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: " in capsys.readouterr().err


def test_bench_decode_devices_needs_two_devices_and_compares_the_outputs(capsys):
    """This process has one device: the program says how to fake more. `bench` times and
    compares the two paths (here a mesh of one device against the plain call's device)."""
    import jax
    from flax import nnx

    from benchmarks import bench_decode_devices
    from flax_transformer import Transformer, TransformerConfig

    if len(jax.local_devices()) == 1:
        assert bench_decode_devices.main(["--no-write"]) == 2
        assert "--fake-cpu-devices 2" in capsys.readouterr().err
    model = Transformer(TransformerConfig.preset("small", **bench_decode_devices.MODEL),
                        rngs=nnx.Rngs(0))
    for decoding in ("greedy", "beam"):
        one, split, same = bench_decode_devices.bench(
            model, jax.local_devices()[:1], decoding, batch=3, src_len=4, new_tokens=4,
            beam_size=2, repeats=1)
        assert one > 0 and split > 0 and same


def test_results_section_is_replaced_alone_and_broken_markers_are_refused(tmp_path):
    from benchmarks.common import write_results_section

    results = tmp_path / "RESULTS.md"
    write_results_section("bench_x (cpu)", "first", results)
    write_results_section("bench_y (cpu)", "other", results)
    write_results_section("bench_x (cpu)", "second", results)
    text = results.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- bench_x:cpu:start -->") == 1
    # An end marker lost in a hand edit: replacing would cut everything up to the next
    # end marker, appending would leave two starts. The file is kept; the section goes aside.
    broken = text.replace("<!-- bench_x:cpu:end -->\n", "")
    results.write_text(broken)
    with pytest.raises(ValueError, match=r"1 '<!-- bench_x:cpu:start -->' and 0"):
        write_results_section("bench_x (cpu)", "third", results)
    assert results.read_text() == broken
    assert "third" in (tmp_path / "RESULTS.md.bench_x-cpu.md").read_text()
    results.write_text(text + text)  # the section twice
    with pytest.raises(ValueError, match="want one pair"):
        write_results_section("bench_x (cpu)", "fourth", results)
    assert results.read_text() == text + text


def test_bench_attention_without_torch_drops_it_with_the_install_hint(tmp_path, monkeypatch,
                                                                      capsys):
    import importlib.util

    from benchmarks import bench_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    ran = []

    def fake_case(spec, timeout, mem_limit):
        ran.append(spec["impl"])
        return case_result(0.1, 0.3)

    monkeypatch.setattr(bench_attention, "run_case", fake_case)
    bench_attention.main(["--lengths", "128", "--causal", "--impls", "blockwise,torch",
                          "--no-results"])
    assert ran == ["blockwise"]
    assert "torch not installed: pip install -e .[bench]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="torch is not installed"):
        bench_attention.main(["--lengths", "128", "--impls", "torch", "--no-results"])


def test_bench_attention_files_a_torch_only_run_under_torchs_device(tmp_path, monkeypatch):
    from benchmarks import bench_attention

    real = bench_attention.importlib.util.find_spec
    monkeypatch.setattr(bench_attention.importlib.util, "find_spec",  # as on a torch machine
                        lambda name, *a: True if name == "torch" else real(name, *a))
    monkeypatch.setattr(bench_attention, "run_case", lambda spec, timeout, mem_limit:
                        case_result(0.001, 0.003, dtype="bfloat16", backend="gpu", jax=None))
    results = tmp_path / "RESULTS.md"
    bench_attention.main(["--lengths", "128", "--causal", "--impls", "torch",
                          "--results", str(results), "--out", str(tmp_path / "p.png")])
    text = results.read_text()
    assert "## bench_attention (gpu)" in text and "peak device MiB" in text


def test_bench_attention_estimates_the_calls_a_case_makes(monkeypatch, capsys):
    """A length is skipped when (T'/T)^2 x the worker's calls (warm-ups and --repeats timed
    calls) would pass --timeout: here 4x (5 x 1 s + 4 x 2 s) = 52 s > 40 s."""
    from benchmarks import bench_attention
    from benchmarks.attention_case import calls

    assert calls(3, 1.0) == (5, 4) and calls(3, 6.0) == (2, 2)
    lengths = []

    def fake_case(spec, timeout, mem_limit):
        lengths.append(spec["length"])
        return case_result(1.0, 2.0, repeats=3)

    monkeypatch.setattr(bench_attention, "run_case", fake_case)
    bench_attention.main(["--lengths", "128,256", "--causal", "--impls", "blockwise",
                          "--repeats", "3", "--timeout", "40", "--no-results"])
    assert lengths == [128] and "skip" in capsys.readouterr().out


@pytest.mark.parametrize("module, argv, flag", [
    ("bench_decode", ["--preset", "tiny", "--new-tokens", "65"], "--new-tokens"),
    ("bench_decode", ["--preset", "tiny", "--src-len", "100", "--new-tokens", "8"], "--src-len"),
    ("bench_decode_devices", ["--new-tokens", "100"], "--new-tokens"),
    ("bench_train", ["--torch-threads", "0"], "--torch-threads"),
    ("bench_train", ["--configs", "small", "small"], "--configs"),
    ("g2p_accelerator", ["--minutes", "nan"], "--minutes"),
])
def test_benchmark_flags_out_of_range_are_usage_errors(module, argv, flag, capsys):
    import importlib

    parse_args = importlib.import_module(f"benchmarks.{module}").parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
