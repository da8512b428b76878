"""`project`: x @ w (+ b) for the model's projections, accumulating low-precision inputs in
float32.

For float32 (or float64) inputs `project` is exactly `x @ w + b`, computed as one 2-D matmul.
For bfloat16 and float16 inputs every product is accumulated in float32, the bias added in
float32, and the sum rounded once to the input dtype, forward and backward (a
`jax.custom_vjp`: the incoming gradient is rounded to the compute dtype, so all three matmuls
of a training step take low-precision operands; the bias gradient is a float32 sum; and, as
for any `custom_vjp`, a bf16/f16 model takes reverse-mode derivatives only). That is
what GPUs and TPUs do inside a bf16 matmul anyway; on CPUs with bf16 dot-product instructions
(AVX512-BF16, AMX), XLA only uses them for dots whose output is float32, so a plain bf16
`x @ w` runs as an emulated float32 matmul and is no faster than float32. On CPU the weight
gradient x^T g is also laid out for those kernels (see `_weight_grad_cpu`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _accumulates_in_float32(dtype) -> bool:
    return jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating)


def _dot(a: jnp.ndarray, b: jnp.ndarray, contract: tuple[int, int], out_dtype) -> jnp.ndarray:
    """a . b over a's axis contract[0] and b's axis contract[1], float32 sums, out_dtype."""
    dims = (((contract[0] % a.ndim,), (contract[1] % b.ndim,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul_low_precision(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None,
                          w_rows: bool):
    """rows x [N, D] @ w [D, F] (+ b [F]) -> [N, F], float32 sums rounded once to x.dtype;
    with w_rows, w is stored [F, D] and x @ w^T is computed reading it row-major."""
    y = _dot(x, w, (1, 1 if w_rows else 0), jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _matmul_fwd(x, w, b, w_rows):
    return _matmul_low_precision(x, w, b, w_rows), (x, w, b)


def _matmul_bwd(w_rows, residuals, g):
    x, w, b = residuals
    # The bias gradient, summed in float32 from the gradient as it arrives. Left to
    # autodiff (a bf16 broadcast's transpose), XLA:CPU sums it through a separate float32
    # copy and a tree of reduce-windows: ~30% of a bf16 G2P train step (RESULTS.md).
    db = None if b is None else jnp.sum(g.astype(jnp.float32), axis=0).astype(b.dtype)
    g = g.astype(x.dtype)
    dx = _dot(g, w, (1, 0 if w_rows else 1), x.dtype)  # g [N, F] . w over F -> [N, D]
    left, right = (g, x) if w_rows else (x, g)  # dw = left^T right: g^T x [F, D] or x^T g
    dw = lax.platform_dependent(left, right, cpu=partial(_weight_grad_cpu, dtype=w.dtype),
                                default=partial(_weight_grad, dtype=w.dtype))
    return dx, dw, db


_matmul_low_precision.defvjp(_matmul_fwd, _matmul_bwd)


def _weight_grad(rows_x, rows_g, dtype):
    """x [N, D], g [N, F] -> x^T g [D, F]: contracts the first axis of both."""
    return _dot(rows_x, rows_g, (0, 0), dtype)


def _weight_grad_cpu(rows_x, rows_g, dtype):
    """`_weight_grad` with an operand transposed in memory for XLA:CPU's bf16 matmul kernels.

    XLA:CPU gives a bf16 dot to its bf16 kernels only when both operands contract their last
    axis or the lhs its last and the rhs its first, in row-major memory; x^T g does not, so it
    would run as an upcast float32 matmul (about half as fast on AVX512-BF16, a third on
    AMX). A plain x.T is folded back into the dot (or given a column-major layout), so the
    smaller of x^T [D, N] and g^T [F, N] is concatenated with a zero row, a real copy XLA
    keeps, and the matching output row is dropped: x^T g directly, or (g^T x)^T when g is
    the narrower (an FFN's W2 gradient: 3x faster than copying the wider x).
    """
    n = rows_x.shape[0]
    if rows_g.shape[1] < rows_x.shape[1]:
        padded = jnp.concatenate([rows_g.T, jnp.zeros((1, n), rows_g.dtype)])
        return _dot(padded, rows_x, (1, 0), dtype)[:-1].T
    padded = jnp.concatenate([rows_x.T, jnp.zeros((1, n), rows_x.dtype)])
    return _dot(padded, rows_g, (1, 0), dtype)[:-1]


def project(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., D] @ w [D, F] (+ b [F]) -> [..., F] (float32 accumulation for bf16/f16).

    w may have more trailing axes, w [D, *F] (and b [*F]): the result is then [..., *F].
    x and w of different dtypes are promoted first, as by `x @ w`; the result has that dtype
    whatever b's (a float32 bias is added before the one rounding to bf16, and its gradient
    is float32).
    """
    if x.ndim < 1 or w.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"project: x {x.shape} and w {w.shape} do not chain (last axis of x "
                         "must equal the first axis of w)")
    if b is not None and tuple(b.shape) != tuple(w.shape[1:]):
        raise ValueError(f"project: bias b {b.shape} must have w's output shape "
                         f"{tuple(w.shape[1:])} (w {w.shape})")
    dtype = jnp.result_type(x, w)  # mixed inputs promote as `x @ w` would
    x, w = x.astype(dtype), w.astype(dtype)
    # As one 2-D matmul, rows [N, D] @ w [D, F]: its autodiff backward is then two plain
    # 2-D matmuls; a tensordot over [B, T, D] and [D, H, Dh] contracts pairs of axes in the
    # backward pass, which XLA:CPU relays out (3-7% of a float32 train step, RESULTS.md).
    rows, w2d = x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1)
    if _accumulates_in_float32(x.dtype):
        b1d = None if b is None else b.reshape(-1)
        return _matmul_low_precision(rows, w2d, b1d, False).reshape(*x.shape[:-1], *w.shape[1:])
    y = (rows @ w2d).reshape(*x.shape[:-1], *w.shape[1:])
    return y if b is None else y + b.astype(dtype)


def unembed(x: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """x [..., D] @ table [V, D]^T -> [..., V]: the pre-softmax projection tied to an embedding
    table, read in its stored layout (float32 accumulation for bf16/f16, as `project`).

    `project(x, table.T)` computes the same, but in bf16 XLA:CPU then gives the shared
    transposed table a column-major layout and runs the forward and input-gradient matmuls
    upcast to float32 (RESULTS.md); here each matmul reads the table row-major.
    """
    if x.ndim < 1 or table.ndim != 2 or x.shape[-1] != table.shape[-1]:
        raise ValueError(f"unembed: x {x.shape} and table {table.shape} do not fit (need x "
                         "[..., D] and table [V, D])")
    dtype = jnp.result_type(x, table)
    x, table = x.astype(dtype), table.astype(dtype)
    rows = x.reshape(-1, x.shape[-1])
    if _accumulates_in_float32(dtype):
        y = _matmul_low_precision(rows, table, None, True)
    else:
        y = rows @ table.T
    return y.reshape(*x.shape[:-1], table.shape[0])
