"""Decoding split over devices: each device decodes its share of a batch's rows vs one device
decoding them all, side by side in one run.

    python -m benchmarks.bench_decode_devices                      # every local device
    python -m benchmarks.bench_decode_devices --fake-cpu-devices 2  # a CPU as two devices

A model of the `g2p` run preset's shape (d_model 128, 4 heads, d_ff 512, 2+2 layers, vocab
64; random weights) decodes `--batch` random sources of `--src-len` tokens: greedily for
`--new-tokens` steps (eos ignored, so every row runs every step) and by beam search
(`--beam-size`, up to `--new-tokens` tokens, stopping when the beams are done: the same work
either way, as the outputs are the same). "split" is `greedy_decode(..., devices=D)` /
`beam_search(..., devices=D)` (`flax_transformer/parallel.py`), "one" the same call on the
first device. Compile time is excluded (a warm-up call); times are the median of `--repeats`
calls, the two alternating. `--fake-cpu-devices N` makes a CPU look like N devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX starts); they share its
cores. Prints a table with the ratio and rewrites this program's section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    add_malloc_flag,
    command_line,
    configure_malloc,
    describe_machine,
    malloc_note,
    markdown_table,
    positive_int,
    time_alternating,
    today,
    write_results_section,
)

MODEL = dict(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2, num_decoder_layers=2,
             dropout_rate=0.0, max_len=64, src_vocab_size=64, tgt_vocab_size=64)


def bench(model, devices, decoding: str, batch: int, src_len: int, new_tokens: int,
          beam_size: int, repeats: int, seed: int = 0):
    """(median s on one device, median s split over `devices`, same outputs) for one decoding
    ("greedy" or "beam") of one random batch; the two are timed alternately."""
    from flax_transformer.decoding import beam_search, greedy_decode

    vocab = model.config.src_vocab_size
    src = np.random.default_rng(seed).integers(4, vocab, size=(batch, src_len)).astype(np.int32)
    if decoding == "greedy":
        call = functools.partial(greedy_decode, model, src, max_len=new_tokens, ignore_eos=True)
    else:
        call = functools.partial(beam_search, model, src, beam_size=beam_size,
                                 max_len=new_tokens)
    paths = {"one": functools.partial(call, devices=list(devices[:1])),
             "split": functools.partial(call, devices=list(devices))}
    outputs, times = time_alternating(paths, repeats)
    # greedy returns tokens, beam search (tokens, scores)
    tokens = {name: np.asarray(out[0] if isinstance(out, tuple) else out)
              for name, out in outputs.items()}
    same = bool(np.array_equal(tokens["one"], tokens["split"]))
    return times["one"], times["split"], same


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=512,
                        help="sources per call (512, the g2p preset's evaluation batch)")
    parser.add_argument("--src-len", type=positive_int, default=12, help="source length (12)")
    parser.add_argument("--new-tokens", type=positive_int, default=16,
                        help="tokens to generate at most (16)")
    parser.add_argument("--beam-size", type=positive_int, default=4, help="beams (4)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed calls per path (5)")
    parser.add_argument("--fake-cpu-devices", type=positive_int, default=None,
                        help="on a CPU: run as this many devices (they share its cores)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    add_malloc_flag(parser)
    args = parser.parse_args(argv)
    for flag, value in (("--src-len", args.src_len), ("--new-tokens", args.new_tokens)):
        if value > MODEL["max_len"]:
            parser.error(f"argument {flag}: {value} is longer than the model's max_len "
                         f"{MODEL['max_len']}; give at most {MODEL['max_len']}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_malloc(args.default_malloc)
    if args.fake_cpu_devices:  # before JAX starts its backend, which reads the flag once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={args.fake_cpu_devices}").strip()
    import jax
    from flax import nnx

    from flax_transformer import Transformer, TransformerConfig

    devices = jax.local_devices()
    if len(devices) < 2:
        print(f"error: this machine has one {devices[0].platform} device; on a CPU pass "
              "--fake-cpu-devices 2 (in a fresh process: JAX reads the flag once)",
              file=sys.stderr)
        return 2
    model = Transformer(TransformerConfig.preset("small", **MODEL), rngs=nnx.Rngs(0))
    machine = describe_machine()
    print(machine)
    header = ["decoding", "batch", "devices", "one device s", "split s",
              "speedup (one / split)", "same tokens"]
    rows = []
    load_before = os.getloadavg()[0]
    for decoding in ("greedy", "beam"):
        one, split, same = bench(model, devices, decoding, args.batch, args.src_len,
                                 args.new_tokens, args.beam_size, args.repeats)
        name = decoding if decoding == "greedy" else f"beam {args.beam_size}"
        rows.append([name, args.batch, len(devices), f"{one:.3f}", f"{split:.3f}",
                     f"{one / split:.2f}x", "yes" if same else "NO"])
        print(markdown_table(header, rows[-1:]), flush=True)
    table = markdown_table(header, rows)
    load = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print()
    print(table)
    print(f"1-minute load average: {load} ({os.cpu_count()} CPUs)")
    if args.no_write:
        return 0
    command = command_line("bench_decode_devices", argv)
    body = "\n".join([
        "Decoding split over devices (`greedy_decode` / `beam_search` with `devices=`, each "
        "device decoding its share of the rows) against the same call on one device, for a "
        "model of the `g2p` preset's shape with random weights; greedy ignores eos; compile "
        f"excluded; median of {args.repeats} calls, alternating. Source length "
        f"{args.src_len}, at most {args.new_tokens} new tokens."
        + (f" The {args.fake_cpu_devices} devices are one CPU's, faked: they share its cores."
           if args.fake_cpu_devices else ""),
        "",
        f"- date: {today()}",
        f"- machine: {machine}",
        f"- 1-minute load average during the run: {load}",
        f"- command: `{command}`; {malloc_note(args.default_malloc)}",
        "",
        table,
    ])
    path = write_results_section(f"bench_decode_devices ({devices[0].platform})", body)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
