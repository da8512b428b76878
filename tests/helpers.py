"""Test helpers: a float64 NumPy reference of attention, error measures, random inputs and a
walk over jaxprs. Plain functions, imported as `from helpers import ...` (conftest.py holds the
session's settings and fixtures and is never imported by tests)."""

import numpy as np


def reference_attention(q, k, v, mask=None, causal=False):
    """Float64 NumPy multi-head attention. q [B,Tq,H,D], k/v [B,Tk,H,D], mask [B|1,H|1,Tq,Tk]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    tq, tk = q.shape[1], k.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(scores.shape, bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), scores.shape)
    if causal:
        allowed &= np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)
    scores = np.where(allowed, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    total = weights.sum(-1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def random_qkv(rng, batch=2, tq=5, tk=7, heads=3, dk=8, dv=8, dtype=np.float32):
    q = rng.normal(size=(batch, tq, heads, dk)).astype(dtype)
    k = rng.normal(size=(batch, tk, heads, dk)).astype(dtype)
    v = rng.normal(size=(batch, tk, heads, dv)).astype(dtype)
    return q, k, v


def jaxpr_equations(jaxpr):
    """Every equation of `jaxpr`, those of inner jaxprs (pjit, custom_vjp, cond) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple) else (param,):
                inner = getattr(inner, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_equations(getattr(inner, "jaxpr", inner))
