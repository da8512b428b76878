"""Analytic model FLOPs of a Transformer train step, and the device's measured matmul peak.

Counted: every matmul (a multiply-add is 2 FLOPs); softmax, LayerNorm, dropout and the
optimizer are not counted (they are a few % and not "model FLOPs"). Per sequence pair with
source length S, target length T, width d, FFN width f, vocabulary V:

  encoder layer:  S * (8 d^2 + 4 d f) + 4 S^2 d          (Q,K,V,O projections; FFN; QK^T, AV)
  decoder layer:  T * (8 d^2 + 4 d f) + 4 T^2 d          (masked self-attention + FFN)
                + T * 4 d^2 + S * 4 d^2 + 4 T S d        (cross-attention: Q,O; K,V; QK^T, AV)
  output layer:   2 T d V
  train step = 3 x forward (the backward pass costs twice the forward), times the batch.
The causal mask's skipped half of T^2 is counted as done, as the dense kernels do it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from flax_transformer import TransformerConfig


def forward_flops(c: TransformerConfig, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs of one forward pass over one (source, target) pair."""
    d, f, s, t = c.d_model, c.d_ff, src_len, tgt_len
    encoder = s * (8 * d * d + 4 * d * f) + 4 * s * s * d
    decoder = (t * (8 * d * d + 4 * d * f) + 4 * t * t * d
               + t * 4 * d * d + s * 4 * d * d + 4 * t * s * d)
    output = 2 * t * d * c.tgt_vocab_size
    return c.num_encoder_layers * encoder + c.num_decoder_layers * decoder + output


def train_step_flops(c: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
    return 3.0 * batch * forward_flops(c, src_len, tgt_len)


# Matmul shapes (m, k, n) whose best FLOP/s is the measured peak. One square product is not
# the best a CPU does: on a 2-core Intel Xeon, 2048^3 measured 117-174 GFLOP/s from run to
# run while the `base` model's own products reached 150-196, so a peak of 2048^3 alone put
# the model above "100%" of it on a bad draw. On CPU: squares of 1024 and 2048 plus the
# shapes of `bench_train`'s configs (tokens x d_model x d_ff, tokens x d_model x vocab) at
# batch x length = 512 and 1024 tokens. On an accelerator a large square reaches the peak
# (a 2048 product there takes about the dispatch time and would understate it).
CPU_PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (512, 512, 2048), (512, 2048, 512),
                   (512, 512, 32000), (1024, 256, 1024), (1024, 1024, 256), (1024, 256, 8000))
ACCELERATOR_PEAK_SHAPES = ((8192, 8192, 8192),)


def matmul_flops_per_second(m: int, k: int, n: int, dtype=jnp.float32,
                            repeats: int = 10) -> float:
    """Best FLOP/s of an [m, k] x [k, n] matmul on the default device over `repeats` runs
    (after one warm-up), float32 sums for every dtype (see `measured_peak_flops`)."""
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    accumulate = jnp.promote_types(dtype, jnp.float32)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=accumulate))
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def measured_peak_flops(dtype=jnp.float32, shapes=None, repeats: int = 10) -> float:
    """The achievable matmul peak of the default device: the best FLOP/s over `shapes`
    ((m, k, n) triples; default `CPU_PEAK_SHAPES` on CPU, `ACCELERATOR_PEAK_SHAPES` else).

    Sums are float32 for every dtype, as in the models' projections (`kernels.project`): a
    bf16 matmul with a bf16 result would measure XLA:CPU's emulated path, not the hardware.
    """
    if shapes is None:
        shapes = CPU_PEAK_SHAPES if jax.default_backend() == "cpu" else ACCELERATOR_PEAK_SHAPES
    if not shapes:
        raise ValueError("measured_peak_flops needs at least one (m, k, n) shape")
    return max(matmul_flops_per_second(*shape, dtype=dtype, repeats=repeats) for shape in shapes)


# Dense datasheet peaks (FLOP/s) for accelerators whose device_kind we recognise. JAX computes
# float32 dots on these GPUs in TF32 on the tensor cores (its default precision), so the
# float32 entry is the TF32 peak, not the 67 TFLOP/s of the non-tensor-core units.
DATASHEET_PEAK = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 494e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 494e12,
}
