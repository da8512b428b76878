"""`TrainingConfig`: everything about a run that is not the model, validated when built.

A run is fully defined by a `TransformerConfig`, a `TrainingConfig` and the data on disk: the
seed fixes the parameter initialisation, the order of the training batches and every dropout
mask. Run presets (`RUN_PRESETS`) pair a model preset with training settings for each task.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..config import ConfigMethods, TransformerConfig, as_bool, as_finite_float, option
from ..data import available_tasks
from ..data.translate import BLEU_TOKENIZERS, CORPORA

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("noam", "cosine", "rsqrt", "constant")
# The fields that name files or directories (saved as absolute paths).
DATA_PATH_FIELDS = ("train_file", "valid_file", "test_file", "data_dir")  # where the data is
PATH_FIELDS = (*DATA_PATH_FIELDS, "init_from")
# The fields read only when a tokenizer is built: a run started with init_from reuses the
# source run's tokenizers, so it must not ask for other values (training/loop.py refuses).
TOKENIZER_FIELDS = ("subword_vocab_size",)
DECODERS = ("greedy", "beam")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(ConfigMethods):
    """Hyperparameters of training, evaluation and checkpointing.

    Learning rate: `lr_schedule="noam"` is the paper's
    lr = learning_rate * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)
    (learning_rate is the scale factor, 1.0 in the paper); "cosine" warms up linearly to
    `learning_rate` and decays to `learning_rate * min_lr_ratio` at `steps` (or restarts
    `lr_cycles` times: equal cycles of warmup + decay, so a finished run can be continued
    with another cycle and equal a run planned that way from the start); "rsqrt" warms up
    linearly to `learning_rate` then decays as (warmup_steps / step)^0.5; "constant" warms up
    linearly and stays. Schedules count optimizer updates: `steps` training batches make
    `steps // accumulate_steps` of them.
    `batch_size` is sequences per batch; every batch is padded to one of `num_buckets` lengths.
    `eval_examples` caps the validation examples decoded for the task metric (0: all).
    `eval_buckets`: the valid and test splits are padded to at most this many lengths, shared
    by both (each compiles its own loss step and decoding loop, see `evaluate.py`).
    `corpus` picks the translate task's built-in corpus ("bible", the default, or
    "trans-de-en"); `train_file`/`valid_file`/`test_file` give your own TSV instead.
    `reverse_target` trains the model to emit each target right to left (the tokens before
    eos reversed); its outputs are put back in order before scoring and printing. Such a
    model can rescore another's n-best list (`train.py --evaluate --rescore-with`).
    `devices` > 1 trains data parallel (`parallel.py`): each batch is split by rows across that
    many local devices, which must divide `batch_size`; 0 (the default) takes as many as
    divide it, so one GPU or a CPU trains on one device as before. The result is the same as
    on one device up to the order of floating-point sums. Validation and the test report
    split their batches over the same devices, each decoding its own rows. Reading a finished
    run (`--evaluate`, `--predict`) decodes on `devices` local devices, 0 meaning all of them
    (the count the run trained on does not matter there).
    `init_from` names another run's work directory, of the same task: its latest parameters
    start this run (fine-tuning; e.g. a right-to-left model from a left-to-right one) and its
    tokenizers are reused (so `TOKENIZER_FIELDS` must keep that run's values); the step, the
    optimizer state, the data order and dropout start afresh. `average_checkpoints` > 1
    makes the run's model (the test report, `--predict`, `--evaluate`, `--init-from`) the
    mean of the parameters of its last `average_checkpoints` checkpoints, as the paper
    averages the last 5 written 10 minutes apart: choose
    `checkpoint_every` so that they span the end of training (training and `--resume` go on
    from the last checkpoint itself). `tensorboard` writes TensorBoard event files beside
    `metrics.jsonl` (it needs the `tensorboardX` package; `--no-tensorboard` writes the JSONL
    log alone).
    """

    task: str = option("g2p", "g2p, translate, copy or reverse")
    seed: int = option(0, "fixes the initial parameters, the batch order and every dropout mask")
    steps: int = option(
        10000, "training batches (the optimizer updates steps // accumulate_steps times)")
    batch_size: int = option(64, "sequences per batch")
    num_buckets: int = option(4, "training batches are padded to one of this many lengths")
    log_every: int = option(100, "steps between training metrics (fetched from the device then)")
    eval_every: int = option(2000, "steps between validations")
    checkpoint_every: int = option(
        2000, "steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = option(3, "checkpoints kept, the latest ones")
    average_checkpoints: int = option(1, "the run's model is the mean of its last N checkpoints")
    optimizer: str = option("adam", "adam or adamw (decoupled weight decay on matrices)")
    learning_rate: float = option(
        1.0, "peak learning rate; with lr_schedule noam, the scale factor")
    lr_schedule: str = option(
        "noam", "noam (the paper's), cosine, rsqrt or constant, each after a warmup")
    warmup_steps: int = option(4000, "optimizer updates of linear warmup")
    min_lr_ratio: float = option(0.0, "cosine: the final learning rate as a fraction of the peak")
    lr_cycles: int = option(1, "cosine: equal warmup+decay cycles (N - 1 warm restarts)")
    adam_b1: float = option(0.9, "Adam beta1")
    adam_b2: float = option(0.98, "Adam beta2")
    adam_eps: float = option(1e-9, "Adam epsilon")
    weight_decay: float = option(0.0, "adamw: decoupled weight decay")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (0: none)")
    grad_clip: float = option(1.0, "global gradient norm limit (0: no clipping)")
    accumulate_steps: int = option(
        1, "batches whose gradients are averaged into one update (each batch's token-mean "
           "gradient weighs the same, however many tokens it has)")
    devices: int = option(
        0, "local devices that split each batch (data parallel; 0: as many as divide it; "
           "--evaluate/--predict: 0 is all)")
    decode: str = option("greedy", "decoding for the task metric and --predict: greedy or beam")
    beam_size: int = option(4, "beams of beam search")
    length_penalty: float = option(0.6, "beam search: GNMT length penalty alpha (0: none)")
    reverse_target: bool = option(False, "learn to write each target right to left")
    init_from: str | None = option(
        None, "start from the latest parameters of this run directory (fine-tuning)")
    eval_batch_size: int = option(256, "sequences per batch when evaluating and decoding")
    eval_buckets: int = option(2, "valid and test are padded to at most this many lengths")
    eval_examples: int = option(1000, "validation examples decoded for the task metric (0: all)")
    max_examples: int | None = option(
        None, "use at most this many examples of each split (a quick try)")
    subword_vocab_size: int = option(8000, "translate: size of the joint SentencePiece vocabulary")
    corpus: str | None = option(None, "translate: built-in corpus bible (default) or trans-de-en")
    bleu_tokenize: str = option(
        "13a", "translate: sacreBLEU's tokenizer for BLEU (13a; zh, ja-mecab, ko-mecab or char "
        "for targets without spaces between words)")
    train_file: str | None = option(None, "your training pairs: source<TAB>target per line")
    valid_file: str | None = option(None, "your validation pairs (default: carved from train_file)")
    test_file: str | None = option(None, "your test pairs (default: carved from train_file)")
    data_dir: str | None = option(
        None, "folder with the task's data file instead of the installed package's")
    tensorboard: bool = option(True, "also write TensorBoard event files (needs tensorboardX)")

    def with_absolute_paths(self) -> TrainingConfig:
        """This config with its data files, data_dir and init_from as absolute paths (what a
        run saves, so that its config works from any directory)."""
        return self.replace(**{name: os.path.abspath(getattr(self, name))
                               for name in PATH_FIELDS if getattr(self, name) is not None})

    def missing_data(self) -> str | None:
        """None, or a ValueError message naming the data files and data_dir this config names
        that no longer exist (a run's data moved), with the flags that point at them anew."""
        gone = [f"--{name.replace('_', '-')} {getattr(self, name)}"
                for name in DATA_PATH_FIELDS
                if getattr(self, name) is not None and not os.path.exists(getattr(self, name))]
        if not gone:
            return None
        return (f"the run's data is no longer where it was ({', '.join(gone)}): pass its new "
                "location with the same flag(s); the run checks that the data is the same")

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "num_buckets", "log_every", "eval_every",
                    "checkpoint_every", "keep_checkpoints", "average_checkpoints",
                    "accumulate_steps", "beam_size",
                    "lr_cycles", "eval_batch_size", "eval_buckets", "subword_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.steps >= 2**31:  # the step counter is an int32 on the device
            raise ValueError(f"steps must be below 2**31, got {self.steps}")
        for name in ("seed", "warmup_steps", "eval_examples", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("learning_rate", "min_lr_ratio", "adam_b1", "adam_b2", "adam_eps",
                     "weight_decay", "label_smoothing", "grad_clip", "length_penalty"):
            as_finite_float(name, getattr(self, name))  # NaN passes every range test below
        if self.max_examples is not None and (not isinstance(self.max_examples, int)
                                              or isinstance(self.max_examples, bool)):
            raise ValueError(f"max_examples must be an integer (or unset), got "
                             f"{self.max_examples!r}")
        for name in ("reverse_target", "tensorboard"):  # frozen: stored as plain bools
            object.__setattr__(self, name, as_bool(name, getattr(self, name)))
        if self.init_from is not None and (not isinstance(self.init_from, str)
                                           or not self.init_from.strip()):
            raise ValueError(f"init_from must be a run's work directory, got {self.init_from!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 (or unset), got {self.max_examples}")
        if self.task not in available_tasks():
            raise ValueError(f"task={self.task!r} is not known; choose one of "
                             f"{available_tasks()}")
        for name in DATA_PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, name, value)  # frozen: stored as a plain str
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a path (or unset), got {value!r}")
        choices = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "decode": DECODERS,
                   "bleu_tokenize": BLEU_TOKENIZERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not known; choose one of {allowed}"
                )
        if self.bleu_tokenize != "13a" and self.task != "translate":
            raise ValueError(f"bleu_tokenize is an option of task 'translate', not "
                             f"{self.task!r}; drop --bleu-tokenize")
        if self.corpus is not None:
            if self.task != "translate":
                raise ValueError(f"corpus is an option of task 'translate', not {self.task!r}; "
                                 "drop --corpus")
            if self.corpus not in CORPORA:
                raise ValueError(f"corpus={self.corpus!r} is not known; choose one of {CORPORA}")
            if self.train_file is not None:
                raise ValueError("give either corpus or train_file (your own TSV), not both")
        if self.average_checkpoints > self.keep_checkpoints:
            raise ValueError(
                f"average_checkpoints={self.average_checkpoints} needs that many checkpoints "
                f"kept, but keep_checkpoints={self.keep_checkpoints}; raise keep_checkpoints to "
                f"{self.average_checkpoints} (or average fewer)"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule == "noam" and self.warmup_steps < 1:
            raise ValueError("lr_schedule='noam' needs warmup_steps >= 1 (the paper uses 4000)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_cycles > 1:
            if self.lr_schedule != "cosine":
                raise ValueError(f"lr_cycles={self.lr_cycles} needs lr_schedule='cosine' "
                                 f"(got {self.lr_schedule!r}); set lr_cycles=1")
            if self.num_updates % self.lr_cycles:
                raise ValueError(f"lr_cycles={self.lr_cycles} must divide the "
                                 f"{self.num_updates} optimizer updates; make steps a multiple "
                                 f"of {self.lr_cycles * self.accumulate_steps}")
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.weight_decay > 0 and self.optimizer != "adamw":
            raise ValueError(
                f"weight_decay={self.weight_decay} needs optimizer='adamw' (Adam has no "
                "decoupled weight decay); set optimizer='adamw' or weight_decay=0"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if self.steps < self.accumulate_steps:
            raise ValueError(
                f"steps={self.steps} is smaller than accumulate_steps={self.accumulate_steps}: "
                "no optimizer update would happen; raise steps"
            )

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what was meant, one line each (train.py
        prints them): a cosine cycle that never decays, batches never applied."""
        out = []
        cycle = self.num_updates // self.lr_cycles
        if self.lr_schedule == "cosine" and self.warmup_steps >= cycle:
            out.append(f"warmup_steps={self.warmup_steps} is not below the {cycle} optimizer "
                       "updates of each cosine cycle: the learning rate never decays to "
                       "min_lr_ratio (lower --warmup-steps or raise --steps)")
        if self.steps % self.accumulate_steps:
            out.append(f"the last {self.steps % self.accumulate_steps} of steps={self.steps} "
                       f"batches do not fill an update of accumulate_steps="
                       f"{self.accumulate_steps}: they are never applied (make --steps a "
                       "multiple of it)")
        return out

    @property
    def num_updates(self) -> int:
        """Optimizer updates in the run (batches / accumulate_steps)."""
        return self.steps // self.accumulate_steps


@dataclasses.dataclass(frozen=True)
class RunPreset:
    """A model preset with overrides, plus training settings, under one name."""

    model_preset: str
    model: dict[str, Any]
    training: dict[str, Any]
    about: str = ""


RUN_PRESETS: dict[str, RunPreset] = {
    "copy": RunPreset(
        "tiny", dict(d_model=64, d_ff=128, max_len=32),
        dict(task="copy", steps=600, batch_size=32, num_buckets=3, log_every=50,
             eval_every=300, checkpoint_every=300, lr_schedule="cosine", learning_rate=5e-3,
             warmup_steps=50, eval_examples=200, eval_batch_size=100),
        "smoke test: a tiny model on the synthetic copy task, about a minute"),
    "g2p": RunPreset(
        "small", dict(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2,
                      num_decoder_layers=2, dropout_rate=0.0, max_len=48, dtype="auto"),
        dict(task="g2p", steps=5500, batch_size=256, num_buckets=5, log_every=50,
             eval_every=2000, checkpoint_every=2000, lr_schedule="cosine", learning_rate=3e-3,
             warmup_steps=200, min_lr_ratio=0.05, grad_clip=1.0, decode="beam", beam_size=4,
             eval_examples=1000, eval_batch_size=512),
        "the default: CMUdict G2P sized for <= 15 minutes on a quiet 2-core CPU"),
    "g2p-long": RunPreset(
        "small", dict(d_model=192, num_heads=4, d_ff=768, num_encoder_layers=3,
                      num_decoder_layers=3, dropout_rate=0.1, max_len=48),
        dict(task="g2p", steps=48000, batch_size=256, num_buckets=5, log_every=100,
             eval_every=2000, checkpoint_every=1000, lr_schedule="cosine", learning_rate=2e-3,
             lr_cycles=4, warmup_steps=400, min_lr_ratio=0.05, grad_clip=1.0, decode="beam",
             beam_size=4, eval_examples=1000, eval_batch_size=512),
        "a longer CMUdict G2P run (3+3 layers, d_model 192, four 12k-step cosine cycles): "
        "3.5-6 hours on 2 CPU cores"),
    "translate": RunPreset(
        "small", dict(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=3,
                      num_decoder_layers=3, dropout_rate=0.1, max_len=128,
                      share_embeddings=True),
        dict(task="translate", steps=4000, batch_size=64, num_buckets=6, log_every=50,
             eval_every=2000, checkpoint_every=1000, lr_schedule="cosine", learning_rate=2e-3,
             warmup_steps=300, min_lr_ratio=0.05, decode="beam", beam_size=4,
             eval_examples=300, eval_batch_size=128, subword_vocab_size=4000),
        "German -> English Bible translation sized for a ~15-minute CPU run"),
    "trans-de-en": RunPreset(
        "small", dict(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=3,
                      num_decoder_layers=3, dropout_rate=0.1, max_len=96,
                      share_embeddings=True),
        dict(task="translate", corpus="trans-de-en", steps=3000, batch_size=128, num_buckets=5,
             log_every=50, eval_every=1500, checkpoint_every=1000, lr_schedule="cosine",
             learning_rate=2e-3, warmup_steps=300, min_lr_ratio=0.05, decode="beam",
             beam_size=4, eval_examples=500, eval_batch_size=256, subword_vocab_size=4000),
        "German -> English on Debian's trans-de-en example sentences (apt-get install "
        "trans-de-en), ~10 minutes"),
}

# The preset a task uses when --preset is not given (tasks not listed: "small" model defaults).
TASK_PRESETS = {"copy": "copy", "reverse": "copy", "g2p": "g2p", "translate": "translate"}


def resolve_preset(
    name: str | None, task: str | None
) -> tuple[TransformerConfig, TrainingConfig]:
    """(model config, training config) for a run preset or a model preset name.

    `name=None` picks the task's default preset. A model preset ("tiny", "small", "base",
    "big") gives that model with default training settings. `task`, when given, overrides the
    preset's task.
    """
    from ..config import PRESETS as MODEL_PRESETS

    if name is None:
        name = TASK_PRESETS.get(task or TrainingConfig.task, "small")
    if name in RUN_PRESETS:
        preset = RUN_PRESETS[name]
        model = TransformerConfig.preset(preset.model_preset, **preset.model)
        training = TrainingConfig(**preset.training)
    elif name in MODEL_PRESETS:
        model, training = TransformerConfig.preset(name), TrainingConfig()
    else:
        known = sorted(RUN_PRESETS) + sorted(MODEL_PRESETS)
        raise ValueError(f"preset {name!r} is not known; choose one of {known}")
    if task is not None:
        training = training.replace(task=task)
    return model, training
