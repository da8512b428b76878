"""Flax NNX modules that own parameters and call the kernels."""

from .attention import KVCache, MultiHeadAttention
from .layers import (
    AddNorm,
    Decoder,
    DecoderLayer,
    DecoderLayerCache,
    Encoder,
    EncoderLayer,
    FeedForward,
)
from .transformer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DecodeCache,
    Transformer,
    check_tokens,
)

__all__ = [
    "AddNorm", "BOS_ID", "DecodeCache", "Decoder", "DecoderLayer", "DecoderLayerCache", "EOS_ID",
    "KVCache", "Encoder", "EncoderLayer",
    "FeedForward", "MultiHeadAttention", "PAD_ID", "Transformer", "UNK_ID", "check_tokens",
]
