"""`TransformerConfig`: every hyperparameter of the model, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import numpy as np

from .kernels import ACTIVATIONS, IMPLEMENTATIONS
from .runtime import native_compute_dtype

NORMS = ("post", "pre")
DTYPES = ("float32", "bfloat16", "float16")


def as_positive_int(name: str, value: Any) -> int:
    """`value` as a Python int (NumPy integers accepted); ValueError unless an integer >= 1."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
            or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def as_finite_float(name: str, value: Any) -> float:
    """`value` as a Python float (ints and NumPy numbers accepted); ValueError unless a finite
    real number (not a bool or a string)."""
    numbers = (int, float, np.integer, np.floating)
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers)
            or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float (or int), got {value!r}")
    return float(value)


def as_bool(name: str, value: Any) -> bool:
    """`value` as a Python bool (NumPy bools accepted); ValueError for anything else (1, "yes")."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def option(default: Any, help: str) -> Any:
    """A config field with its one-line `help` (shown by `train.py --help`)."""
    return dataclasses.field(default=default, metadata={"help": help})


# Type checks (and conversion to plain Python values) by field annotation.
FIELD_TYPES = {"int": as_positive_int, "float": as_finite_float, "bool": as_bool}


class ConfigMethods:
    """`replace`, `to_dict`, `from_dict` for the frozen, self-validating config dataclasses."""

    def replace(self, **overrides: Any) -> Self:
        """A copy with `overrides` applied (validated); unknown fields raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown {type(self).__name__} field(s) {unknown}; known fields: {sorted(known)}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        return cls().replace(**values)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ConfigMethods):
    """Hyperparameters of the encoder-decoder Transformer (defaults: the paper's base model).

    norm: "post" is the paper's Add&Norm, LayerNorm(x + Sublayer(x)); "pre" is
        x + Sublayer(LayerNorm(x)) with a final LayerNorm after each stack.
    dtype: compute dtype: "float32", "bfloat16", "float16", or "auto", replaced at
        construction by `runtime.native_compute_dtype()` (bfloat16 on GPU/TPU and on CPUs with
        bf16 dot-product units, AVX512-BF16 or AMX; float32 elsewhere; asking starts JAX);
        param_dtype: storage dtype of parameters.
    attention_impl: "dense" (the default: full score matrix, hand-written backward pass, the
        fastest for short sequences), "vmap" (the reference), "xla"
        (jax.nn.dot_product_attention) or "blockwise" (memory O(T), for long sequences).
    share_embeddings: one embedding table for source and target (needs equal vocab sizes).
    tie_output: the pre-softmax projection reuses the target embedding matrix.
    remat: recompute each layer's activations in the backward pass (less memory, more FLOPs).
    scan_layers: run each stack's identical layers as one `lax.scan` over their stacked
        variables: XLA compiles one layer instead of N (same parameters, same function).
    """

    src_vocab_size: int = option(
        32000, "source vocabulary size, ids 0-3 included (train.py: from the data)")
    tgt_vocab_size: int = option(
        32000, "target vocabulary size, ids 0-3 included (train.py: from the data)")
    d_model: int = option(512, "width of the embeddings and of every sub-layer's output")
    num_heads: int = option(8, "attention heads; must divide d_model")
    d_ff: int = option(2048, "inner width of the position-wise feed-forward network")
    num_encoder_layers: int = option(6, "encoder layers")
    num_decoder_layers: int = option(6, "decoder layers")
    dropout_rate: float = option(
        0.1, "dropout on embeddings and on each sub-layer's output (0: none)")
    attention_dropout_rate: float = option(0.0, "dropout on the attention weights")
    max_len: int = option(256, "longest source or target in tokens (bos/eos included)")
    norm: str = option("post", "Add&Norm: post (the paper's LayerNorm(x + f(x))) or pre")
    activation: str = option("relu", "feed-forward non-linearity: relu, gelu, gelu_tanh, silu")
    share_embeddings: bool = option(
        False, "one embedding table for source and target (equal vocabularies)")
    tie_output: bool = option(True, "the output layer reuses the target embedding matrix")
    dtype: str = option("float32", "compute dtype: float32, bfloat16, float16, or auto "
                                   "(bfloat16 where the chip has bf16 matmul units)")
    param_dtype: str = option("float32", "storage dtype of the parameters")
    attention_impl: str = option(
        "dense", "attention kernel: dense, vmap (the reference), xla, blockwise (long sequences)")
    attention_block_size: int = option(512, "blockwise kernel tiles: b queries x b/2 keys")
    layer_norm_epsilon: float = option(1e-6, "LayerNorm epsilon")
    remat: bool = option(
        False, "recompute each layer's activations in the backward pass (less memory)")
    scan_layers: bool = option(
        False, "run each stack's layers as one lax.scan (one layer compiled, not N)")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.type in FIELD_TYPES:  # every int field is a size or count: >= 1
                value = FIELD_TYPES[field.type](field.name, getattr(self, field.name))
                object.__setattr__(self, field.name, value)  # frozen: plain int/float/bool
        if self.src_vocab_size < 4 or self.tgt_vocab_size < 4:
            raise ValueError(
                "src_vocab_size and tgt_vocab_size must be >= 4 (ids 0-3 are pad, bos, eos, unk), "
                f"got {self.src_vocab_size} and {self.tgt_vocab_size}"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides d_model (e.g. d_model=512, num_heads=8)"
            )
        if self.d_model % 2:
            raise ValueError(f"d_model must be even for sinusoidal positions, got {self.d_model}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}; e.g. 1e-6"
            )
        for name in ("dtype", "param_dtype"):  # np.float32, jnp.bfloat16, ... -> its name
            value = getattr(self, name)
            if not isinstance(value, str):
                try:
                    object.__setattr__(self, name, np.dtype(value).name)
                except TypeError:
                    pass  # not a dtype: refused below
        choices = {"norm": NORMS, "activation": tuple(ACTIVATIONS),
                   "dtype": (*DTYPES, "auto"), "param_dtype": DTYPES,
                   "attention_impl": IMPLEMENTATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not known; choose one of {allowed}"
                )
        if self.dtype == "auto":  # stored resolved: a saved config names what it computed in
            object.__setattr__(self, "dtype", native_compute_dtype())
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "share_embeddings=True needs src_vocab_size == tgt_vocab_size, got "
                f"{self.src_vocab_size} and {self.tgt_vocab_size}; use one joint vocabulary "
                "or set share_embeddings=False"
            )
        if self.attention_dropout_rate > 0 and self.attention_impl != "vmap":
            raise ValueError(
                f"attention_dropout_rate > 0 is only supported by attention_impl='vmap', "
                f"got attention_impl={self.attention_impl!r}; set attention_impl='vmap' or "
                "attention_dropout_rate=0"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named configuration, `"tiny"`, `"small"`, `"base"` or `"big"`, with overrides."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset {name!r} is not known; choose one of {sorted(PRESETS)}")
        return cls().replace(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters, compiles in seconds.
    "tiny": dict(src_vocab_size=32, tgt_vocab_size=32, d_model=32, num_heads=4, d_ff=64,
                 num_encoder_layers=2, num_decoder_layers=2, max_len=64, dropout_rate=0.0),
    # A CPU-sized model for real tasks such as G2P.
    "small": dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, max_len=128),
    # The paper's base and big models (Table 3).
    "base": dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                 num_decoder_layers=6, dropout_rate=0.1),
    "big": dict(d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=6,
                num_decoder_layers=6, dropout_rate=0.3),
}


def check_config(config: Any) -> TransformerConfig:
    """`config`, or a ValueError unless it is a `TransformerConfig` (e.g. a plain dict)."""
    if not isinstance(config, TransformerConfig):
        raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}; "
                         "build one with TransformerConfig(...) or TransformerConfig.preset(name)"
                         + (" (a dict: TransformerConfig.from_dict(d))"
                            if isinstance(config, dict) else ""))
    return config
