#!/usr/bin/env bash
# The benchmark suite sized for one GPU (or TPU): the issue's two train-step configs, `base` at
# a batch that fills the chip, and attention up to 64k tokens with the fused-kernel peers.
# Each program rewrites its own section of benchmarks/RESULTS.md as it goes, so a run cut short
# keeps what finished. About 9 minutes on one H200 (estimated from the parts timed there on
# 2026-11-26: ~130 s, ~90 s, ~9 s per attention case).
#
#   bash benchmarks/accelerator_suite.sh            # or: PYTHON=python3 bash ...
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1
status=0
$PYTHON -m benchmarks.bench_train --steps 10 --repeats 3 || status=1
$PYTHON -m benchmarks.bench_train --configs base --batch 256 --steps 5 --repeats 3 || status=1
$PYTHON -m benchmarks.bench_attention --lengths 1024,16384,65536 --impls vmap,xla,dense,blockwise,jax.nn,cudnn,torch --repeats 10 --timeout 60 --mem-limit-gb 60 --out benchmarks/attention_gpu.png || status=1
exit $status
