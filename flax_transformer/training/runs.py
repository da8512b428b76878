"""A run's work directory after training: the task it was trained on (`build_task`), its
model from the latest checkpoint or the mean of the last few (`latest_state`), and what reads
it: `predict`, `evaluate_run` (with ensembles and rescoring partners), and `pretrained_params`
for fine-tuning (`TrainingConfig.init_from`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ..config import TransformerConfig
from ..data import Task, changed_splits, load_task, restore_task
from ..decoding import ensemble_members
from .checkpoint import Checkpointer, load_run_config, tokenizer_dir
from .config import TrainingConfig
from .evaluate import (
    EvalSet,
    cut_warning,
    decode_examples,
    eval_batch_size,
    eval_bucket_lengths,
    predict_texts,
)
from .optim import make_optimizer
from .parallel import decoding_devices
from .rescore import Scorer, check_same_tokenizers, rescored_predictions
from .state import init_model, init_train_state


def build_task(config: TrainingConfig, tokenizers: str | Path | None = None) -> Task:
    """The task named by `config.task`, with the config's data options; `tokenizers` reuses
    saved tokenizers (resume, predict). Raises ValueError for an empty training split."""
    options: dict[str, Any] = {}
    if config.task == "translate":
        options.update(vocab_size=config.subword_vocab_size, corpus=config.corpus,
                       bleu_tokenize=config.bleu_tokenize)
    task = load_task(config.task, seed=config.seed, train_file=config.train_file,
                     valid_file=config.valid_file, test_file=config.test_file,
                     data_dir=config.data_dir, max_examples=config.max_examples,
                     tokenizer_dir=tokenizers, **options)
    if not task.train:
        raise ValueError(f"task {config.task!r} has no training examples (empty dataset)")
    return task


def latest_state(workdir: str | Path, config_overrides: dict[str, Any] | None = None):
    """(ModelParts, TrainState, model config, training config) of the latest checkpoint in
    `workdir`, its parameters the mean of the last `average_checkpoints` checkpoints when the
    run's config (or `config_overrides`, applied to the training config) asks for more than
    one; raises NoCheckpointError if there is none."""
    model_config, config = load_run_config(workdir)
    if config_overrides:
        average = config_overrides.get("average_checkpoints", config.average_checkpoints)
        # Reading a finished run: average what it kept, whatever it was told to keep.
        config = config.replace(**config_overrides,
                                keep_checkpoints=max(config.keep_checkpoints, average))
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, create=False)
    try:
        parts, params = init_model(model_config, config.seed, abstract=True)
        tx, _ = make_optimizer(config, model_config.d_model)
        state, _ = checkpointer.restore_average(init_train_state(params, tx, config.seed),
                                                config.average_checkpoints)
    finally:
        checkpointer.close()
    return parts, state, model_config, config


def pretrained_params(workdir: str | Path, model_config: TransformerConfig, params):
    """(parameters, step) of the latest checkpoint in `workdir`, for a run of `model_config`
    whose `params` (fresh arrays, or `init_model(..., abstract=True)`'s shapes) they replace
    (`TrainingConfig.init_from`).

    Raises ValueError naming the model settings that differ when the shapes do not match."""
    _, state, source_config, _ = latest_state(workdir)
    fits = jax.tree.structure(params) == jax.tree.structure(state.params) and all(
        a.shape == b.shape
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)))
    if not fits:
        differ = [f"{name} {getattr(source_config, name)} there vs {getattr(model_config, name)}"
                  for name in source_config.to_dict()
                  if getattr(source_config, name) != getattr(model_config, name)]
        raise ValueError(f"init_from={str(workdir)!r}: that run's parameters do not fit this "
                         f"model ({'; '.join(differ) or 'a different structure'}); use the "
                         "same model settings as that run (train.py takes them from it)")
    return state.params, int(state.step)


def load_for_prediction(workdir: str | Path, config_overrides: dict[str, Any] | None = None):
    """(model in eval mode, task with its tokenizers, training config with `config_overrides`)
    from the latest checkpoint in `workdir` (see `latest_state`); raises NoCheckpointError if
    there is none."""
    parts, state, _, config = latest_state(workdir, config_overrides)
    task = restore_task(tokenizer_dir(workdir))
    return parts.model(state.params), task, config


def predict(workdir: str | Path, texts: list[str], *,
            config_overrides: dict[str, Any] | None = None,
            ensemble_with: Sequence[str | Path] = ()) -> list[str]:
    """Outputs of the latest checkpoint in `workdir` for `texts` (decoding options such as
    `decode`/`beam_size`, and `average_checkpoints`, may be overridden); `ensemble_with`: other
    runs decoded together with it (beam search only, see `evaluate_run`)."""
    model, task, config = load_for_prediction(workdir, config_overrides)
    devices = decoding_devices((config_overrides or {}).get("devices", 0))
    return predict_texts(ensemble(model, task, config, ensemble_with), task, texts, config,
                         devices)


def _partner(workdir: str | Path, task: Task, max_len: int, role: str):
    """(model, training config) of another run that joins the decoding one: same tokenizers
    as `task`, and a max_len of at least `max_len` (ValueError otherwise)."""
    other_model, other_task, other_config = load_for_prediction(workdir)
    if other_config.task != task.name:
        raise ValueError(f"{role} run {workdir} learned task {other_config.task!r}, the "
                         f"decoding run {task.name!r}; combine runs of one task")
    check_same_tokenizers(task, other_task, f"{role} run {workdir}")
    if other_model.config.max_len < max_len:
        raise ValueError(f"{role} run {workdir}: its model's max_len "
                         f"{other_model.config.max_len} is below the decoding model's "
                         f"{max_len}, so it cannot score every hypothesis")
    return other_model, other_config


def ensemble(model, task: Task, config: TrainingConfig, others: Sequence[str | Path]):
    """`model` alone, or with no others given; else the list of `model` and the models of the
    runs `others`, which must read targets as `config` says (`reverse_target`)."""
    if not others:
        return model
    if config.decode != "beam":
        raise ValueError("--ensemble-with needs beam search: add --decode beam")
    members = [model]
    for other in others:
        other_model, other_config = _partner(other, task, model.config.max_len, "ensemble")
        if other_config.reverse_target != config.reverse_target:
            way = "right to left" if other_config.reverse_target else "left to right"
            raise ValueError(f"ensemble run {other} reads targets {way} and the decoding run "
                             "the other way; an ensemble's models must read them alike (pass "
                             "a reversed run to --rescore-with instead)")
        members.append(other_model)
    return members


def evaluate_run(workdir: str | Path, *, rescore_with: Sequence[str | Path] = (),
                 ensemble_with: Sequence[str | Path] = (),
                 config_overrides: dict[str, Any] | None = None,
                 splits: Sequence[str] = ("valid", "test")) -> dict[str, dict[str, float]]:
    """The task metric of the latest checkpoint in `workdir` on every example of `splits`,
    decoded as the run's config says (`decode`, `beam_size`, ..., and `average_checkpoints`
    may be overridden).

    ensemble_with: work directories of other runs of the same task, reading targets in the
    same direction, decoded together with this run's model as an ensemble (beam search over
    the mean of their probabilities, `decoding.beam_search`).
    rescore_with: work directories of other runs of the same task (e.g. one trained with
    `reverse_target`) whose models rerank the beam's hypotheses (see `rescore.py`).
    Decoding runs on `config_overrides["devices"]` local devices (0, the default: all of
    them; not the count the run trained on), each decoding its share of every batch.
    Returns {split: metrics}; a split without examples is left out.
    """
    model, saved, config = load_for_prediction(workdir, config_overrides)
    devices = decoding_devices((config_overrides or {}).get("devices", 0))
    if rescore_with and config.decode != "beam":
        raise ValueError("--rescore-with needs beam search: add --decode beam")
    # The partners are checked against the run's saved tokenizers, before the data loads.
    max_len = model.config.max_len
    decoder = ensemble(model, saved, config, ensemble_with)
    scorers = [Scorer(other_model, other_config.reverse_target)
               for other_model, other_config in (_partner(other, saved, max_len, "rescoring")
                                                 for other in rescore_with)]
    if devices is not None:  # the models' weights on every device once, not once per batch
        for member in [*ensemble_members(decoder), *(scorer.model for scorer in scorers)]:
            nnx.update(member, devices.replicate(nnx.state(member)))
    if missing := config.missing_data():
        raise ValueError(missing)
    task = build_task(config, tokenizer_dir(workdir))
    changed = changed_splits(task, tokenizer_dir(workdir), splits)
    if changed:
        print(f"warning: the data changed since the run in {workdir} started "
              f"({'; '.join(changed)}); it is scored on the data as it is now", file=sys.stderr)
    for warning in task.data_warnings(splits):
        print(f"warning: {warning}", file=sys.stderr)
    chosen = {split: task.split(split) for split in splits}
    chosen = {split: examples for split, examples in chosen.items() if examples}
    lengths = (eval_bucket_lengths(list(chosen.values()), config.eval_buckets, max_len)
               if chosen else ())
    results: dict[str, dict[str, float]] = {}
    for split, examples in chosen.items():
        eval_set = EvalSet(examples, lengths, max_len,
                           eval_batch_size(config.eval_batch_size, list(chosen.values()),
                                           1 if devices is None else devices.size),
                           reverse_target=config.reverse_target)
        warning = cut_warning({split: eval_set.cut}, max_len)
        if warning:
            print(warning, file=sys.stderr)
        start = time.perf_counter()
        predictions = (rescored_predictions(decoder, scorers, eval_set, config, devices)
                       if scorers else decode_examples(decoder, eval_set, config, devices))
        scores = {k: float(v) for k, v in task.score(predictions, examples).items()}
        results[split] = {**scores, "decode_seconds": time.perf_counter() - start}
    return results
