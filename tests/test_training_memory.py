"""The pre-flight memory check: exact parameter counts, a lower bound by part, clear refusals."""

import pytest

from flax_transformer import TransformerConfig
from flax_transformer.training import memory
from flax_transformer.training.memory import (
    GIB,
    check_training_memory,
    num_parameters,
    training_memory,
)
from flax_transformer.training.state import count_params, init_model

TINY = dict(src_vocab_size=11, tgt_vocab_size=13, d_model=16, num_heads=2, d_ff=24,
            num_encoder_layers=1, num_decoder_layers=2, max_len=20)


@pytest.mark.parametrize("tie_output", [True, False])
def test_num_parameters_matches_the_built_model(tie_output):
    config = TransformerConfig(**TINY, tie_output=tie_output)
    assert num_parameters(config) == count_params(init_model(config, seed=0)[1])


def test_training_memory_by_part():
    config = TransformerConfig(**TINY)
    n = num_parameters(config)
    parts = training_memory(config, batch_size=5, target_len=7)
    activations = 4 * 5 * 7 * (3 * 16 + 24 + 2 * 7)  # 3 layer inputs, FFN hidden, scores
    assert parts == {"state": 16 * n, "activations": activations,
                     "logits": 2 * 4 * 5 * 7 * 13, "positions": 12 * 20 * 16}
    blockwise = TransformerConfig(**TINY, attention_impl="blockwise", dtype="bfloat16")
    assert training_memory(blockwise, batch_size=5, target_len=7)["activations"] == (
        2 * 5 * 7 * (3 * 16 + 24))  # no score matrix; 2-byte elements
    accumulating = training_memory(config, batch_size=5, target_len=7, accumulate_steps=2)
    assert accumulating["state"] == 20 * n


def _refusal(config, available, **batch):
    with pytest.raises(ValueError) as info:
        check_training_memory(config, available=available, **batch)
    return str(info.value)


def test_refusal_names_the_largest_part_and_its_flags():
    wide = TransformerConfig(**{**TINY, "d_model": 8192, "num_heads": 8, "d_ff": 32768})
    message = _refusal(wide, 1 * GIB, batch_size=4, target_len=8)
    assert "1.0 GiB of memory is available" in message
    assert "parameters, gradients and Adam moments" in message and "--d-model" in message

    tiny = TransformerConfig(**{**TINY, "tgt_vocab_size": 50_000})
    message = _refusal(tiny, GIB, batch_size=100_000, target_len=64)
    assert "(logits of one batch 2384.2 GiB, activations" in message  # largest first
    assert "parameters" not in message and "positional" not in message  # under 0.05 GiB
    assert "lower --batch-size (or the target vocabulary)" in message

    deep = TransformerConfig(**{**TINY, "num_encoder_layers": 12, "num_decoder_layers": 12})
    message = _refusal(deep, GIB, batch_size=1_000_000, target_len=64)
    assert "activations of one batch" in message and "lower --batch-size" in message

    long = TransformerConfig(**{**TINY, "max_len": 100_000_000})
    assert "lower --max-len" in _refusal(long, GIB, batch_size=4, target_len=8)


def test_a_run_that_fits_passes_and_unknown_memory_is_not_checked(monkeypatch):
    config = TransformerConfig(**TINY)
    need = sum(training_memory(config, batch_size=4, target_len=8).values())
    check_training_memory(config, batch_size=4, target_len=8, available=need)
    with pytest.raises(ValueError):
        check_training_memory(config, batch_size=4, target_len=8, available=need - 1)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: None)
    check_training_memory(config, batch_size=4, target_len=8)  # no figure: no refusal


def test_available_memory_on_this_host():
    available = memory.available_memory()
    assert available is None or 0 < available < 2**50
