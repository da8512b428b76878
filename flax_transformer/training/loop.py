"""`train(...)`: the whole run behind `train.py` - data, model, steps, validation, checkpoints,
metrics, the final test report - and `predict(...)` / `evaluate_run(...)` from a finished work
directory."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ..config import TransformerConfig
from ..data import (
    Task,
    batch_stream,
    fit_to_length,
    load_task,
    restore_task,
    reverse_targets,
)
from .buckets import optimal_bucket_lengths
from .checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    TOKENIZER_DIR,
    Checkpointer,
    load_run_config,
    save_run_config,
    tokenizer_dir,
)
from .config import TrainingConfig
from .evaluate import EvalSet, decode_examples, eval_bucket_lengths, evaluate, predict_texts
from .loss import summarize
from .metrics import (
    METRICS_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    check_tensorboard,
    plot_curves,
)
from .optim import learning_rate_at, make_optimizer
from .rescore import Scorer, check_same_tokenizers, rescored_predictions
from .state import count_params, init_model, init_train_state
from .step import batch_arrays, make_eval_step, make_train_step, sum_metrics

SUMMARY_FILE = "summary.json"
RUN_FILES = (CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_DIR, METRICS_FILE, TENSORBOARD_DIR,
             PLOT_FILE, SUMMARY_FILE)


def build_task(config: TrainingConfig, tokenizers: str | Path | None = None) -> Task:
    """The task named by `config.task`, with the config's data options; `tokenizers` reuses
    saved tokenizers (resume, predict). Raises ValueError for an empty training split."""
    options: dict[str, Any] = {}
    if config.task == "translate":
        options.update(vocab_size=config.subword_vocab_size, corpus=config.corpus)
    task = load_task(config.task, seed=config.seed, train_file=config.train_file,
                     valid_file=config.valid_file, test_file=config.test_file,
                     data_dir=config.data_dir, max_examples=config.max_examples,
                     tokenizer_dir=tokenizers, **options)
    if not task.train:
        raise ValueError(f"task {config.task!r} has no training examples (empty dataset)")
    return task


def clear_run(workdir: str | Path) -> None:
    """Deletes the files a previous run wrote in `workdir` (and nothing else). Refuses a
    directory that holds files with a run's names but no run config: they are not ours."""
    workdir = Path(workdir)
    present = [name for name in RUN_FILES if (workdir / name).exists()]
    if present and not (workdir / CONFIG_FILE).is_file():
        raise ValueError(f"{workdir} holds {', '.join(present)} but no {CONFIG_FILE}: not a "
                         "run of this program, so --overwrite will not delete them; choose "
                         "another --workdir")
    for name in RUN_FILES:
        path = Path(workdir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stdout)


def _format(results: dict[str, float], metric: str | None) -> str:
    names = dict.fromkeys(["loss", "accuracy", metric, "per", "wer_no_stress", "per_no_stress"])
    return ", ".join(f"{n} {results[n]:.4f}" for n in names if n and n in results)


def train(model_config: TransformerConfig, config: TrainingConfig, workdir: str | Path, *,
          resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains `model_config` on `config.task` in `workdir`; returns the run's summary.

    resume: continue from the latest checkpoint in workdir (the data stream and dropout masks
    continue exactly where they stopped). overwrite: delete a previous run's files first.
    The vocabulary sizes of `model_config` are replaced by the task's.
    """
    started = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file, not a directory; choose a directory")
    if overwrite and resume:
        raise ValueError("--overwrite deletes the run that --resume would continue; use one")
    # Data files as absolute paths: the saved config must work from any directory.
    config = config.replace(**{
        name: str(Path(getattr(config, name)).absolute())
        for name in ("train_file", "valid_file", "test_file", "data_dir", "init_from")
        if getattr(config, name) is not None})
    init_from = None if resume or config.init_from is None else Path(config.init_from)
    if init_from is not None:
        if init_from.resolve() == workdir.resolve():  # resolve() makes both absolute
            raise ValueError(f"init_from={config.init_from!r} is this run's own workdir; use "
                             "--resume to continue it, or train in another --workdir")
        # Before anything is deleted: NoCheckpointError if there is no run there.
        source_task = load_run_config(init_from)[1].task
        if source_task != config.task:
            raise ValueError(f"init_from={config.init_from!r} learned task {source_task!r}, this "
                             f"run is {config.task!r}; start from a run of the same task (its "
                             "tokenizers and vocabulary come along)")
    if resume and not (workdir / CONFIG_FILE).is_file():
        load_run_config(workdir)  # raises NoCheckpointError with the explanation
    if config.tensorboard:
        check_tensorboard()  # before the data loads and the model compiles
    saved_tokenizers = workdir if resume else init_from
    task = build_task(config, None if saved_tokenizers is None else tokenizer_dir(saved_tokenizers))
    if overwrite:  # only now that the new run's data has loaded: a typo deletes nothing
        clear_run(workdir)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, create=not resume)
    latest = checkpointer.latest_step()
    if not resume and latest is not None:
        checkpointer.close()
        raise ValueError(
            f"{workdir} already holds a run (checkpoint at step {latest}); pass --resume to "
            "continue it, --overwrite to start again, or choose another --workdir"
        )
    if resume and latest is not None and latest >= config.steps:
        checkpointer.close()  # before the run's saved config is rewritten
        raise ValueError(
            f"the run in {workdir} is at step {latest}, and steps={config.steps}: nothing to "
            f"train; pass --steps > {latest} to continue it (or --evaluate to score it)"
        )
    model_config = model_config.replace(src_vocab_size=task.src_vocab_size,
                                        tgt_vocab_size=task.tgt_vocab_size)
    max_len = model_config.max_len
    train_examples, cut = fit_to_length(task.train, max_len)
    if config.reverse_target:
        train_examples = reverse_targets(train_examples)
    buckets = optimal_bucket_lengths(train_examples, config.num_buckets, max_len)

    parts, params = init_model(model_config, config.seed)
    origin = "starting at"
    if init_from is not None:
        params, source_step = pretrained_params(init_from, model_config, params)
        origin = f"from {init_from} (its step {source_step}), starting at"
    tx, schedule = make_optimizer(config, model_config.d_model)
    state = init_train_state(params, tx, config.seed)
    if resume:
        state = checkpointer.restore(state)
    else:
        task.save_tokenizers(tokenizer_dir(workdir))
    save_run_config(workdir, model_config, config)
    start_step = int(state.step)

    _say(f"task {task.name}: {len(task.train)} train / {len(task.valid)} valid / "
         f"{len(task.test)} test examples ({cut} train examples cut to max_len={max_len}); "
         f"buckets {buckets}")
    _say(f"model: {count_params(state.params):,} parameters, d_model {model_config.d_model}, "
         f"{model_config.num_encoder_layers}+{model_config.num_decoder_layers} layers, "
         f"{model_config.dtype} compute; "
         f"{'resuming at' if resume else origin} step {start_step} of {config.steps}")

    train_step = make_train_step(parts, tx, label_smoothing=config.label_smoothing)
    eval_step = make_eval_step(parts, label_smoothing=config.label_smoothing)
    eval_options = dict(batch_size=config.eval_batch_size, reverse_target=config.reverse_target)
    eval_splits = [split for split in (task.valid, task.test) if split]
    eval_lengths = (eval_bucket_lengths(eval_splits, config.eval_buckets, max_len)
                    if eval_splits else ())
    valid_set = valid_decode = None
    if task.valid:
        valid_set = EvalSet(task.valid, eval_lengths, max_len, **eval_options)
        limit = config.eval_examples or len(task.valid)
        valid_decode = (valid_set if limit >= len(task.valid) else
                        EvalSet(task.valid[:limit], eval_lengths, max_len, **eval_options))
    metric = task.metric_name
    writer = MetricsWriter(workdir, start_step=start_step, tensorboard=config.tensorboard)
    stream = batch_stream(train_examples, config.batch_size, config.seed, start_step,
                          bucket_lengths=buckets)
    bar = tqdm(total=config.steps, initial=start_step, desc=f"train {task.name}",
               disable=not progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    pending: list[dict[str, Any]] = []
    tokens, mark = 0, time.perf_counter()
    valid_results: dict[str, float] = {}
    train_results: dict[str, float] = {}
    train_seconds = 0.0
    try:
        for step in range(start_step, config.steps):
            batch = next(stream)
            tokens += batch.num_target_tokens
            state, metrics = train_step(state, batch_arrays(batch))
            pending.append(metrics)
            bar.update(1)
            done, last = step + 1, step + 1 == config.steps
            if done % config.log_every == 0 or last:
                totals = sum_metrics(pending)  # the only host sync of the training steps
                now = time.perf_counter()
                train_seconds += now - mark
                train_results = {**summarize(totals), "grad_norm": totals["grad_norm"],
                                 "lr": learning_rate_at(schedule, config, step),
                                 "tokens_per_s": tokens / max(now - mark, 1e-9)}
                writer.write("train", done, train_results)
                bar.set_postfix(loss=f"{train_results['loss']:.3f}",
                                lr=f"{train_results['lr']:.2e}",
                                tok_s=f"{train_results['tokens_per_s']:.0f}", refresh=False)
                pending, tokens, mark = [], 0, now
            if valid_set is not None and (done % config.eval_every == 0 or last):
                paused = time.perf_counter()
                model = parts.model(state.params)
                valid_results = evaluate(model, eval_step, state.params, valid_set,
                                         valid_decode, task, config)
                writer.write("valid", done, valid_results)
                _say(f"step {done}: valid {_format(valid_results, metric)}")
                mark += time.perf_counter() - paused
            if done % config.checkpoint_every == 0 or last:
                paused = time.perf_counter()
                checkpointer.save(state)
                mark += time.perf_counter() - paused
    except KeyboardInterrupt:
        # Keep what was trained: `state` is a whole step (the data stream and dropout masks
        # follow from its step count), so --resume continues bitwise. Unless the interrupt
        # came between a step's call and the assignment of its result: then the old state's
        # donated buffers are gone and the last checkpoint is what remains.
        intact = not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
        if intact and int(state.step) > (checkpointer.latest_step() or 0):
            checkpointer.save(state)
        saved = checkpointer.latest_step()
        checkpointer.close()
        writer.close()
        _say("interrupted before the first checkpoint: nothing saved" if saved is None else
             f"interrupted: the checkpoint of step {saved} is in {workdir / 'checkpoints'}; "
             "continue with --resume")
        raise
    finally:
        bar.close()
    final_step = int(state.step)
    if checkpointer.latest_step() != final_step:
        checkpointer.save(state)

    final, averaged = checkpointer.average_with(state, config.average_checkpoints)
    final_params = final.params
    test_results: dict[str, float] = {}
    if task.test:
        test_set = EvalSet(task.test, eval_lengths, max_len, **eval_options)
        model = parts.model(final_params)
        test_results = evaluate(model, eval_step, final_params, test_set, test_set, task, config)
        writer.write("test", final_step, test_results)
        weights = (f"mean of the checkpoints of steps {', '.join(map(str, averaged))}"
                   if len(averaged) > 1 else f"step {final_step}")
        _say(f"test ({len(task.test)} examples, {config.decode} decoding, {weights}): "
             f"{_format(test_results, metric)}")
    else:
        _say("no test split: skipping the test report")
    writer.close()
    checkpointer.close()
    plot = plot_curves(workdir, metric)
    summary = {
        "task": task.name, "workdir": str(workdir), "steps": final_step,
        "start_step": start_step, "averaged_steps": averaged, "metric_name": metric,
        "parameters": count_params(state.params), "buckets": list(buckets),
        "eval_buckets": list(eval_lengths),
        "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
        "train": train_results, "valid": valid_results, "test": test_results,
        "plot": str(plot), "config": {"model": model_config.to_dict(),
                                      "training": config.to_dict()},
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


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
        parts, params = init_model(model_config, config.seed)
        tx, _ = make_optimizer(config, model_config.d_model)
        state, steps = checkpointer.restore_average(init_train_state(params, tx, config.seed),
                                                    config.average_checkpoints)
    finally:
        checkpointer.close()
    if len(steps) < config.average_checkpoints:
        print(f"warning: {workdir} holds {len(steps)} checkpoint(s) up to step {steps[-1]}, "
              f"fewer than average_checkpoints={config.average_checkpoints}; using the mean "
              f"of those", file=sys.stderr)
    return parts, state, model_config, config


def pretrained_params(workdir: str | Path, model_config: TransformerConfig, params):
    """(parameters, step) of the latest checkpoint in `workdir`, for a run of `model_config`
    whose freshly initialised `params` they replace (`TrainingConfig.init_from`).

    Raises ValueError naming the model settings that differ when the shapes do not match."""
    _, state, source_config, _ = latest_state(workdir)
    fits = jax.tree.structure(params) == jax.tree.structure(state.params) and all(
        np.shape(a) == np.shape(b)
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
    return predict_texts(ensemble(model, task, config, ensemble_with), task, texts, config)


def _partner(workdir: str | Path, task: Task, max_len: int, role: str):
    """(model, training config) of another run that joins the decoding one: same tokenizers
    as `task`, and a max_len of at least `max_len` (ValueError otherwise)."""
    other_model, other_task, other_config = load_for_prediction(workdir)
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
    Returns {split: metrics}; a split without examples is left out.
    """
    model, saved, config = load_for_prediction(workdir, config_overrides)
    if rescore_with and config.decode != "beam":
        raise ValueError("--rescore-with needs beam search: add --decode beam")
    # The partners are checked against the run's saved tokenizers, before the data loads.
    max_len = model.config.max_len
    decoder = ensemble(model, saved, config, ensemble_with)
    scorers = [Scorer(other_model, other_config.reverse_target)
               for other_model, other_config in (_partner(other, saved, max_len, "rescoring")
                                                 for other in rescore_with)]
    task = build_task(config, tokenizer_dir(workdir))
    chosen = {split: task.split(split) for split in splits}
    chosen = {split: examples for split, examples in chosen.items() if examples}
    lengths = (eval_bucket_lengths(list(chosen.values()), config.eval_buckets, max_len)
               if chosen else ())
    results: dict[str, dict[str, float]] = {}
    for split, examples in chosen.items():
        eval_set = EvalSet(examples, lengths, max_len, config.eval_batch_size,
                           reverse_target=config.reverse_target)
        start = time.perf_counter()
        predictions = (rescored_predictions(decoder, scorers, eval_set, config) if scorers
                       else decode_examples(decoder, eval_set, config))
        scores = {k: float(v) for k, v in task.score(predictions, examples).items()}
        results[split] = {**scores, "decode_seconds": time.perf_counter() - start}
    return results
