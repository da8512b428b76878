"""Flax NNX modules that own parameters and call the kernels."""

from .attention import MultiHeadAttention
from .layers import AddNorm, Decoder, DecoderLayer, Encoder, EncoderLayer, FeedForward
from .transformer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, check_tokens

__all__ = [
    "AddNorm", "BOS_ID", "Decoder", "DecoderLayer", "EOS_ID", "Encoder", "EncoderLayer",
    "FeedForward", "MultiHeadAttention", "PAD_ID", "Transformer", "UNK_ID", "check_tokens",
]
