"""The paper's sinusoidal positional encoding."""

from __future__ import annotations

import numpy as np


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """Table `[max_len, d_model]` (float32):

    PE[pos, 2i] = sin(pos / 10000^(2i/d_model)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model)).
    Computed in float64 with NumPy, so under `jit` it is a compile-time constant.
    """
    for name, value in (("max_len", max_len), ("d_model", d_model)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise ValueError(f"sinusoidal_positions: {name} must be an int, got {value!r}")
    if max_len < 1 or d_model < 2 or d_model % 2:
        raise ValueError(
            f"sinusoidal_positions: need max_len >= 1 and an even d_model >= 2, "
            f"got max_len={max_len}, d_model={d_model}"
        )
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq = np.power(10000.0, -np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    table = np.zeros((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * inv_freq)
    table[:, 1::2] = np.cos(pos * inv_freq)
    return table.astype(np.float32)
