"""Train-step throughput and MFU: flax_transformer vs the same model from Flax's NNX layers
vs PyTorch `nn.Transformer`, interleaved in one run.

    python -m benchmarks.bench_train [--configs small base] [--steps 10] [--repeats 5]
                                     [--dtype auto|float32|bfloat16]

Tokens/s counts source + target tokens. MFU = model FLOPs/s (benchmarks/flops.py) divided by
the matmul peak measured in the same run: the best FLOP/s over a few matmul shapes (on CPU,
squares and the configs' own products, `flops.CPU_PEAK_SHAPES`), best of measurements before
and after each config (and by the datasheet peak when known).
"host ms/step" is the Python loop's time per step until its last step was issued: close to
ms/step, the host (dispatch) is the bottleneck, as for small batches on a GPU.
Torch runs in a child process (its OpenMP threads stall beside an active XLA thread pool)
that times one block when asked, after the JAX frameworks' blocks of each round, so it is
interleaved with them as they are with each other. On a JAX GPU backend it runs on CUDA (JAX
then reserves 45% of the GPU's memory instead of 75%, leaving the rest to torch); on TPU it is
skipped.
All three use AdamW (b2=0.98), dropout 0.1, label-smoothed (0.1) cross-entropy, random tokens.
Ours runs without its gradient-norm metric (`make_train_step(grad_norm=False)`): the peers
compute none, and with no clipping it is an extra pass over the gradients (RESULTS.md).
`--batch N` replaces both configs' batch sizes (16 and 8), e.g. to fill an accelerator; such a
run gets its own RESULTS.md section.
`--attention-impl dense xla` times the library once per attention implementation, interleaved
with the peers (rows "flax_transformer (dense)", ...); a run other than the default
implementation alone gets its own RESULTS.md section.
`--steps-per-call K` makes each jitted call of ours and of the Flax peer run K train steps on
its batch (`jax.lax.scan`, the whole state donated); times are still per step. On a GPU, where
a small step waits on the host's launch of its ~700 kernels, this measures how much of that
overhead K steps per call would save; torch keeps one step per call.

Compute dtype: `--dtype auto` is bfloat16 on GPU/TPU and float32 on CPU; `--dtype bfloat16`
on a CPU runs all three with float32 parameters and bf16 compute (torch under
`torch.autocast`), and the peak is then a bf16 x bf16 -> float32 matmul (AVX512-BF16/AMX).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common
from benchmarks.common import time_steps
from benchmarks.flops import DATASHEET_PEAK, measured_peak_flops, train_step_flops
from benchmarks.peer_flax import FlaxPeerTransformer
from flax_transformer import TransformerConfig
from flax_transformer.kernels import IMPLEMENTATIONS

CONFIGS = {
    "small": dict(config=dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                              num_decoder_layers=3, src_vocab_size=8000, tgt_vocab_size=8000),
                  batch=16, length=64),
    "base": dict(config=dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                             num_decoder_layers=6, src_vocab_size=32000, tgt_vocab_size=32000),
                 batch=8, length=64),
}
LABEL_SMOOTHING = 0.1


def peer_loss(logits, targets):
    """Flax examples' idiom: smoothed one-hot targets, optax softmax cross-entropy."""
    onehot = jax.nn.one_hot(targets, logits.shape[-1])
    smoothed = optax.smooth_labels(onehot, LABEL_SMOOTHING)
    weights = (targets > 0).astype(jnp.float32)
    return (optax.softmax_cross_entropy(logits, smoothed) * weights).sum() / weights.sum()


def repeat_steps(step, k: int):
    """`step(carry, *inputs) -> (carry, out)` run `k` times in one traced call (`lax.scan`
    over the same inputs), returning the final carry and the last step's `out`."""
    if k == 1:
        return step

    def steps(carry, *inputs):
        carry, outs = jax.lax.scan(lambda c, _: step(c, *inputs), carry, None, length=k)
        return carry, jax.tree.map(lambda x: x[-1], outs)

    return steps


def make_flax_step(model: nnx.Module, loss_fn, src, tgt_in, tgt_out, steps_per_call: int = 1):
    """A zero-argument callable running `steps_per_call` jitted AdamW steps over `nnx.split`
    state."""
    tx = make_optax()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = [(params, rest, tx.init(params))]

    def step(carry, src, tgt_in, tgt_out):
        params, rest, opt_state = carry

        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            value = loss_fn(m(src, tgt_in), tgt_out)
            return value, nnx.state(m, nnx.Not(nnx.Param))

        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), value

    step = jax.jit(repeat_steps(step, steps_per_call), donate_argnums=0)

    def run():
        state[0], value = step(state[0], src, tgt_in, tgt_out)
        return value

    run.lower = lambda: step.lower(state[0], src, tgt_in, tgt_out)  # for inspection (HLO)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return run, n_params


def make_optax():
    return optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-9)


def ours_step(config: TransformerConfig, src, tgt_in, tgt_out, steps_per_call: int = 1):
    """The library's own train step (flax_transformer.training), as `train.py` runs it but
    without the gradient-norm metric, which the peers do not compute; with `steps_per_call`
    > 1, that many of its pure steps in one jitted call."""
    from flax_transformer.training import init_model, init_train_state, make_train_step

    parts, params = init_model(config, seed=0)
    tx = make_optax()
    if steps_per_call == 1:
        step = make_train_step(parts, tx, label_smoothing=LABEL_SMOOTHING, grad_norm=False)
    else:
        pure = make_train_step(parts, tx, label_smoothing=LABEL_SMOOTHING, jit=False,
                               grad_norm=False)
        step = jax.jit(repeat_steps(pure, steps_per_call), donate_argnums=0)
    state = [init_train_state(params, tx, seed=0)]
    batch = {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}

    def run():
        state[0], metrics = step(state[0], batch)
        return metrics["loss_sum"]

    run.lower = lambda: step.lower(state[0], batch)  # for inspection (HLO)
    return run, sum(x.size for x in jax.tree.leaves(params))


def peer_step(config: TransformerConfig, src, tgt_in, tgt_out, steps_per_call: int = 1):
    return make_flax_step(FlaxPeerTransformer(config, rngs=nnx.Rngs(0)), peer_loss,
                          src, tgt_in, tgt_out, steps_per_call)


class TorchPeer:
    """The torch peer as a child process (`python -m benchmarks.peer_torch --serve`) that
    times one block of `args.steps` steps each time `block()` asks, so its blocks take turns
    with the JAX frameworks' in each round. Use `start_torch_peer`, and `close()` it."""

    module = "benchmarks.peer_torch"  # the child's program (`python -m`)

    def __init__(self, config: TransformerConfig, batch: int, length: int, args):
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        cmd = [sys.executable, "-m", self.module, "--serve",
               "--config", json.dumps(config.to_dict()), "--batch", str(batch),
               "--length", str(length), "--steps", str(args.steps), "--device", device]
        if args.torch_threads:
            cmd += ["--threads", str(args.torch_threads)]
        repo = Path(__file__).resolve().parent.parent
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill and block it
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, cwd=repo,
                                        env=args.child_env)
        self.params = self._reply()["params"]  # once the child is built and warm

    def _failed(self) -> TorchPeerError:
        """The child's exit, with its stderr as the message."""
        self.process.wait()
        self.stderr.seek(0)
        return TorchPeerError(self.stderr.read())

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise self._failed()
        return json.loads(line)

    def block(self) -> tuple[float, float]:
        """(total, host) seconds per step of one block, as `time_steps`."""
        try:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._failed() from None
        reply = self._reply()
        return reply["seconds"], reply["host_seconds"]

    def close(self) -> None:
        try:
            self.process.stdin.close()  # the child's loop ends at end of input
        except BrokenPipeError:  # it has already exited
            pass
        self.process.wait()
        self.stderr.close()


class TorchPeerError(RuntimeError):
    """The torch child exited early; the message is its stderr."""


def start_torch_peer(config: TransformerConfig, batch: int, length: int, args):
    """A warm `TorchPeer`, or None (with a line on stderr) where torch is not installed or
    has no CUDA on a GPU machine."""
    try:
        return TorchPeer(config, batch, length, args)
    except TorchPeerError as error:
        if "No module named 'torch'" in str(error):
            print("torch not installed: pip install -e .[bench] to include it", file=sys.stderr)
            return None
        if "sees no CUDA device" in str(error):
            print("torch has no CUDA here (a CPU build?): torch peer skipped", file=sys.stderr)
            return None
        raise RuntimeError(f"torch peer failed:\n{str(error)[-2000:]}") from None


def compute_dtype(requested: str) -> str:
    """--dtype auto: bfloat16 on GPU/TPU, float32 on CPU; otherwise the dtype asked for."""
    if requested != "auto":
        return requested
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


OURS = "flax_transformer"
TORCH = "torch nn.Transformer"


def ours_name(impl: str, impls: list[str]) -> str:
    """Row name of the library with attention `impl`: plain when it is the only one timed."""
    return OURS if len(impls) == 1 else f"{OURS} ({impl})"


def make_runners(spec: dict, args) -> tuple[TransformerConfig, int, int, dict]:
    """(config, batch, length, {framework: (run, n_params)}) for one entry of CONFIGS: ours
    once per `args.attention_impl`, then the Flax-layers peer, each running
    `args.steps_per_call` steps per call on one batch of random tokens."""
    configs = {impl: TransformerConfig.preset("base", **spec["config"], dropout_rate=0.1,
                                              max_len=spec["length"],
                                              dtype=compute_dtype(args.dtype),
                                              attention_impl=impl)
               for impl in args.attention_impl}
    config = configs[args.attention_impl[0]]  # the peers ignore attention_impl
    batch, length = args.batch or spec["batch"], spec["length"]
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(4, config.src_vocab_size, (batch, length)), jnp.int32)
    tgt = jnp.asarray(rng.integers(4, config.tgt_vocab_size, (batch, length + 1)), jnp.int32)
    per_call = args.steps_per_call
    runners = {ours_name(impl, args.attention_impl):
               ours_step(c, src, tgt[:, :-1], tgt[:, 1:], per_call)
               for impl, c in configs.items()}
    runners["flax nnx.MultiHeadAttention"] = peer_step(config, src, tgt[:, :-1], tgt[:, 1:],
                                                       per_call)
    return config, batch, length, runners


def bench_config(name: str, spec: dict, args) -> list[dict]:
    """Times of ours (once per --attention-impl) and the peers on one config: one dict per
    framework (seconds per step)."""
    config, batch, length, runners = make_runners(spec, args)
    for run, _ in runners.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(run())
    params = {key: n for key, (_, n) in runners.items()}
    blocks = {key: functools.partial(time_steps, run, args.steps)
              for key, (run, _) in runners.items()}
    torch = None
    if not args.no_torch and jax.default_backend() in ("cpu", "gpu"):
        torch = start_torch_peer(config, batch, length, args)
    if torch is not None:
        params[TORCH], blocks[TORCH] = torch.params, torch.block
    times = {k: [] for k in blocks}
    try:
        for _ in range(args.repeats):  # interleaved, so drift hits every framework alike
            for key, block in blocks.items():
                total, host = block()
                per_call = 1 if key == TORCH else args.steps_per_call
                times[key].append((total / per_call, host / per_call))  # per train step
    finally:
        if torch is not None:
            torch.close()
    flops = train_step_flops(config, batch, length, length)
    results = [dict(config=name, batch=batch, framework=key, params=n_params, flops=flops,
                    tokens=batch * 2 * length,
                    seconds=statistics.median(total for total, _ in times[key]),
                    host_seconds=statistics.median(host for _, host in times[key]))
               for key, n_params in params.items()]
    fastest_peer = min(r["seconds"] for r in results if not r["framework"].startswith(OURS))
    for r in results:
        r["vs_fastest_peer"] = fastest_peer / r["seconds"]
    return results


def table_row(r: dict, peak: float, datasheet: float | None) -> list:
    """One table row of a `bench_config` result, MFU against `peak` (and `datasheet`)."""
    mfu = r["flops"] / r["seconds"]
    return [r["config"], r["batch"], r["framework"], f"{r['params'] / 1e6:.1f}M",
            f"{r['seconds'] * 1e3:.2f}", f"{r['host_seconds'] * 1e3:.2f}",
            f"{r['tokens'] / r['seconds']:,.0f}", f"{mfu / peak:.1%}",
            "-" if datasheet is None else f"{mfu / datasheet:.1%}",
            f"{r['vs_fastest_peer']:.2f}x"]


def add_runner_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `make_runners` reads (shared with profile_train): --batch, --attention-impl,
    --dtype, --steps-per-call; check them with `check_runner_flags`."""
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every config (default: small 16, base 8)")
    parser.add_argument("--attention-impl", nargs="+",
                        default=[TransformerConfig.attention_impl], choices=IMPLEMENTATIONS,
                        help="the library's attention implementation(s); several are timed "
                             "side by side (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="compute dtype of every framework (auto: bfloat16 on GPU/TPU, "
                             "float32 on CPU); parameters stay float32")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="train steps per jitted call of ours and the Flax peer "
                             "(lax.scan; default 1, as train.py runs)")


def check_runner_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       counts: tuple[str, ...] = ()) -> None:
    """Usage errors (naming the flag) for the runner flags and the `counts` fields."""
    if len(set(args.attention_impl)) != len(args.attention_impl):
        parser.error(f"--attention-impl lists an implementation twice: {args.attention_impl}")
    for field in (*counts, "batch", "steps_per_call"):
        value = getattr(args, field)
        if value is not None and value < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per framework")
    add_runner_flags(parser)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-threads", type=common.positive_int, default=None,
                        help="torch intra-op threads (default: torch's own, = cores)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    common.add_malloc_flag(parser)
    args = parser.parse_args(argv)
    check_runner_flags(parser, args, counts=("steps", "repeats"))
    if len(set(args.configs)) != len(args.configs):
        parser.error(f"--configs lists a config twice: {args.configs}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.child_env = common.configure_malloc(args.default_malloc)
    if not args.no_torch:
        # On a GPU, JAX would reserve 75% of the memory at start and hold it while the torch
        # child runs: leave that child half. Read once, when JAX starts its backend (below).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

    dtype = jnp.dtype(compute_dtype(args.dtype))
    # The peak is the best of measurements before and after each config: one measurement
    # taken while a shared machine is busy understates it (160 instead of ~210 GFLOP/s seen).
    peaks = [measured_peak_flops(dtype)]
    device_kind = jax.devices()[0].device_kind
    datasheet = DATASHEET_PEAK.get((device_kind, jnp.dtype(dtype).name))
    header = ["config", "batch", "framework", "params", "ms/step", "host ms/step", "tokens/s",
              "MFU (measured peak)", "MFU (datasheet)", "vs fastest peer"]
    qualifiers = [jax.default_backend()]  # a non-default dtype or batch gets its own section
    if dtype != jnp.dtype(compute_dtype("auto")):
        qualifiers.append(dtype.name)
    if args.batch:
        qualifiers.append(f"batch {args.batch}")
    if sorted(args.configs) != sorted(CONFIGS):  # so a partial run keeps the full table
        qualifiers.append(f"{'/'.join(args.configs)} only")
    if args.steps_per_call > 1:
        qualifiers.append(f"{args.steps_per_call} steps per call")
    if args.attention_impl != [TransformerConfig.attention_impl]:
        qualifiers.append(f"attention {'/'.join(args.attention_impl)}")
    section = f"bench_train ({', '.join(qualifiers)})"
    command = common.command_line("bench_train", argv)
    results = []
    for name in args.configs:
        config_results = bench_config(name, CONFIGS[name], args)
        peaks.append(measured_peak_flops(dtype))
        for r in config_results:  # as each config finishes, in case a later one is cut short
            print(" | ".join(str(c) for c in table_row(r, max(peaks), datasheet)), flush=True)
        results += config_results
        intro = (f"{common.describe_machine()}\n\nDate: {common.today()}; command: `{command}`; "
                 f"{common.malloc_note(args.default_malloc)}\n\n"
                 f"Measured {dtype.name} matmul peak: {max(peaks) / 1e9:,.1f} GFLOP/s (best of "
                 f"{len(peaks)} measurements, before and after each config, each the best "
                 f"over the matmul shapes of `benchmarks/flops.py`)"
                 f"{'' if datasheet is None else f'; datasheet {datasheet / 1e12:,.0f} TFLOP/s'}.")
        rows = [table_row(r, max(peaks), datasheet) for r in results]
        body = f"{intro}\n\n{common.markdown_table(header, rows)}\n"
        if not args.no_write:
            common.write_results_section(section, body)
    print(body)


if __name__ == "__main__":
    main()
