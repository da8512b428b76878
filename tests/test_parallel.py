"""Decoding on several devices (flax_transformer/parallel.py): the argument checks and the
one-device mesh run here; two devices are checked by tests/multi_device.py in a child process
(test_training_parallel.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from flax_transformer import Transformer, TransformerConfig
from flax_transformer.decoding import beam_search, greedy_decode, sequence_log_probs
from flax_transformer.parallel import RowSplit
from flax_transformer.training.parallel import decoding_devices

CONFIG = TransformerConfig.preset("tiny", d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                                  num_decoder_layers=1, max_len=16, src_vocab_size=20,
                                  tgt_vocab_size=20)
SRC = np.array([[5, 6, 7, 8], [9, 4, 0, 0], [11, 12, 13, 0]], np.int32)


@pytest.mark.parametrize("bad", [[], (), "cpu", 0, [0], ["cpu"]])
def test_devices_must_be_a_sequence_of_devices(bad):
    with pytest.raises(ValueError, match="devices must be a non-empty sequence of jax devices"):
        RowSplit.of(bad)
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="devices must be"):
        greedy_decode(model, SRC, max_len=4, devices=bad)


def test_a_device_listed_twice_is_refused():
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="devices lists a device twice"):
        RowSplit.of([device, device])


def test_one_listed_device_decodes_as_the_default():
    """A mesh of one device runs the shard_map'd decoders; the outputs are the plain ones."""
    model = Transformer(CONFIG, rngs=nnx.Rngs(1))
    one = jax.devices()[:1]
    assert RowSplit.of(one) == RowSplit.of(list(one))  # the compile caches key on it
    assert hash(RowSplit.of(one)) == hash(RowSplit.of(tuple(one)))
    np.testing.assert_array_equal(greedy_decode(model, SRC, max_len=6, devices=one),
                                  greedy_decode(model, SRC, max_len=6))
    (a, a_scores), (b, b_scores) = (beam_search(model, SRC, beam_size=2, max_len=6,
                                                return_all_beams=True, devices=d)
                                    for d in (None, one))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a_scores, b_scores, rtol=1e-6)
    np.testing.assert_allclose(sequence_log_probs(model, SRC, a[:, 0], devices=one),
                               sequence_log_probs(model, SRC, a[:, 0]), rtol=1e-6)


def test_decoding_devices_for_a_finished_run():
    local = len(jax.local_devices())
    assert (decoding_devices(0) is None) == (local == 1)  # 0: all of them
    assert decoding_devices(1) is None
    with pytest.raises(ValueError, match=rf"devices={local + 1} but this machine has {local}"):
        decoding_devices(local + 1)
