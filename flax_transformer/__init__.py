"""flax_transformer: the Transformer of "Attention Is All You Need" for JAX and Flax NNX."""

from .config import PRESETS, TransformerConfig
from .nn import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    AddNorm,
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    MultiHeadAttention,
    Transformer,
)

__version__ = "0.1.0"

__all__ = [
    "AddNorm", "BOS_ID", "Decoder", "DecoderLayer", "EOS_ID", "Encoder", "EncoderLayer",
    "FeedForward", "MultiHeadAttention", "PAD_ID", "PRESETS", "Transformer", "TransformerConfig",
    "UNK_ID",
]
