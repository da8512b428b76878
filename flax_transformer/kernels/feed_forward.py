"""Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .matmul import project

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The activation function called `name`; ValueError listing the choices otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"activation must be a name, one of {sorted(ACTIVATIONS)}; got "
                         f"{name!r}")
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation={name!r} is not known; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def check_feed_forward_shapes(x, w1, b1, w2, b2) -> None:
    """Host-side validation of `feed_forward` parameter shapes (static shapes only)."""
    if x.ndim < 1 or w1.ndim != 2 or w2.ndim != 2:
        raise ValueError(
            f"feed_forward: need x [..., D], w1 [D, F], w2 [F, D], got x {x.shape}, "
            f"w1 {w1.shape}, w2 {w2.shape}"
        )
    if x.shape[-1] != w1.shape[0] or w1.shape[1] != w2.shape[0] or w2.shape[1] != x.shape[-1]:
        raise ValueError(
            f"feed_forward: shapes do not chain: x {x.shape}, w1 {w1.shape}, w2 {w2.shape}; "
            "need x [..., D], w1 [D, F], w2 [F, D]"
        )
    for name, b, w_name, w in (("b1", b1, "w1", w1), ("b2", b2, "w2", w2)):
        if b is not None and tuple(b.shape) != (w.shape[1],):
            raise ValueError(
                f"feed_forward: {name} must have shape ({w.shape[1]},) to match {w_name} "
                f"{w.shape}, got {b.shape}"
            )


def feed_forward(
    x: jnp.ndarray,
    w1: jnp.ndarray,
    b1: jnp.ndarray | None,
    w2: jnp.ndarray,
    b2: jnp.ndarray | None,
    *,
    activation: str = "relu",
) -> jnp.ndarray:
    """The paper's FFN applied to every position independently.

    x: [..., D]; w1: [D, F]; b1: [F]; w2: [F, D]; b2: [D]  ->  [..., D]
    """
    act = get_activation(activation)
    check_feed_forward_shapes(x, w1, b1, w2, b2)
    h = act(project(x, w1, b1))
    return project(h, w2, b2)
