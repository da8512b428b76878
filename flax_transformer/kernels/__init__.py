"""Pure JAX kernels (no Flax): attention, projections, feed-forward, masks, positional
encodings."""

from .attention import (
    IMPLEMENTATIONS,
    cache_layout,
    cached_attention,
    multi_head_attention,
    single_head_attention,
)
from .cross_entropy import softmax_cross_entropy
from .dropout import dropout
from .feed_forward import ACTIVATIONS, feed_forward, get_activation
from .layer_norm import layer_norm
from .masks import causal_mask, combine_masks, padding_mask
from .matmul import project, unembed
from .positional import sinusoidal_positions

__all__ = [
    "ACTIVATIONS",
    "IMPLEMENTATIONS",
    "cache_layout",
    "cached_attention",
    "causal_mask",
    "combine_masks",
    "dropout",
    "feed_forward",
    "get_activation",
    "layer_norm",
    "multi_head_attention",
    "padding_mask",
    "project",
    "single_head_attention",
    "softmax_cross_entropy",
    "sinusoidal_positions",
    "unembed",
]
