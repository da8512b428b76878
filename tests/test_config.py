import jax
import numpy as np
import pytest
from flax import nnx

from flax_transformer import Transformer, TransformerConfig


def count_params(config):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_presets_match_the_paper():
    base = TransformerConfig.preset("base")
    assert (base.d_model, base.num_heads, base.d_ff) == (512, 8, 2048)
    assert (base.num_encoder_layers, base.num_decoder_layers) == (6, 6)
    big = TransformerConfig.preset("big")
    assert (big.d_model, big.num_heads, big.d_ff) == (1024, 16, 4096)
    assert TransformerConfig.preset("tiny", d_model=64).d_model == 64


def test_base_has_the_papers_65m_parameters():
    config = TransformerConfig.preset("base", src_vocab_size=37000, tgt_vocab_size=37000,
                                      share_embeddings=True, tie_output=True)
    assert 60e6 <= count_params(config) <= 66e6


def test_sharing_and_tying_remove_parameters():
    tiny = TransformerConfig.preset("tiny")
    separate = count_params(tiny.replace(tie_output=False))
    tied = count_params(tiny.replace(tie_output=True))
    shared = count_params(tiny.replace(tie_output=True, share_embeddings=True))
    v, d = tiny.tgt_vocab_size, tiny.d_model
    assert separate - tied == v * d + v  # output kernel and bias
    assert tied - shared == v * d


def test_round_trip_through_dict():
    config = TransformerConfig.preset("tiny", norm="pre", dtype="bfloat16")
    assert TransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(d_model=30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
        (dict(num_heads=0), "num_heads must be a positive integer"),
        (dict(d_ff=-1), "d_ff must be a positive integer"),
        (dict(num_encoder_layers=1.5), "num_encoder_layers must be a positive integer"),
        (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
        (dict(attention_dropout_rate=-0.1), r"attention_dropout_rate must be in \[0, 1\)"),
        (dict(norm="sandwich"), "norm='sandwich' is not known"),
        (dict(activation="tanh"), "activation='tanh' is not known"),
        (dict(attention_impl="flash"), "attention_impl='flash' is not known"),
        (dict(dtype="int8"), "dtype='int8' is not known"),
        (dict(src_vocab_size=2), "must be >= 4"),
        (dict(share_embeddings=True, src_vocab_size=40), "share_embeddings=True needs"),
        (dict(attention_dropout_rate=0.1, attention_impl="xla"), "attention_impl='vmap'"),
        (dict(d_modle=8), r"unknown TransformerConfig field\(s\) \['d_modle'\]"),
        (dict(tie_output="yes"), "tie_output must be True or False, got 'yes'"),
        (dict(share_embeddings=None), "share_embeddings must be True or False"),
        (dict(remat=1), "remat must be True or False, got 1"),
        (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon must be a finite float"),
        (dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon must be a finite float"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be > 0"),
        (dict(layer_norm_epsilon=-1e-6), "layer_norm_epsilon must be > 0"),
        (dict(dropout_rate="0.1"), "dropout_rate must be a finite float"),
        (dict(dropout_rate=float("nan")), "dropout_rate must be a finite float"),
        (dict(attention_dropout_rate=float("-inf")), "attention_dropout_rate must be a finite"),
        (dict(dropout_rate=True), "dropout_rate must be a finite float"),
        (dict(d_model=True), "d_model must be a positive integer"),
        (dict(d_model=np.float64(32)), "d_model must be a positive integer"),
        (dict(d_model="32"), "d_model must be a positive integer"),
        (dict(num_heads=np.int64(0)), "num_heads must be a positive integer"),
    ],
)
def test_bad_configs_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig.preset("tiny", **overrides)


def test_numpy_scalars_are_accepted_as_plain_python_values():
    config = TransformerConfig.preset(
        "tiny", d_model=np.int64(32), num_heads=np.int32(4), dropout_rate=np.float32(0.25),
        attention_dropout_rate=0, remat=np.bool_(True))
    assert config == TransformerConfig.preset("tiny", dropout_rate=0.25, remat=True)
    assert type(config.d_model) is int and type(config.num_heads) is int
    assert type(config.dropout_rate) is float and type(config.attention_dropout_rate) is float
    assert type(config.remat) is bool
    assert TransformerConfig.from_dict(config.to_dict()) == config


def test_dtypes_given_as_numpy_or_jax_types_are_stored_by_name():
    """jnp.bfloat16, np.float32 or a np.dtype mean what their names do, and the config stays
    JSON-serialisable (it is saved beside every checkpoint)."""
    import json

    import jax.numpy as jnp

    for given in (jnp.bfloat16, jnp.dtype("bfloat16"), "bfloat16"):
        config = TransformerConfig.preset("tiny", dtype=given, param_dtype=np.float32)
        assert config.dtype == "bfloat16" and config.param_dtype == "float32"
        assert TransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="dtype='float64' is not known"):
        TransformerConfig.preset("tiny", dtype=np.float64)
    with pytest.raises(ValueError, match="dtype=5 is not known"):
        TransformerConfig.preset("tiny", dtype=5)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset 'huge' is not known"):
        TransformerConfig.preset("huge")


def test_config_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        TransformerConfig().d_model = 8
