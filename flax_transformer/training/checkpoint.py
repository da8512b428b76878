"""Checkpoints in a work directory: an Orbax `CheckpointManager` plus the run's configs and
tokenizers beside it.

Layout of `workdir`:
    checkpoints/<step>/        the TrainState (step, params, opt_state, rng), the last K kept
    config.json                {"model": TransformerConfig, "training": TrainingConfig}
    tokenizer/                 the task's tokenizers (`Task.save_tokenizers`)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ..config import TransformerConfig
from .config import TrainingConfig
from .state import TrainState, abstract_train_state

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"

# Orbax logs every save and restore at INFO through absl; keep the progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)


def _with_variables(tree):
    """`tree` with every leaf inside an `nnx.State` wrapped in `nnx.Param`: the layout of
    checkpoints written while `TrainState` held Variables (params, Adam's mu and nu)."""
    return jax.tree.map(lambda s: jax.tree.map(nnx.Param, s) if isinstance(s, nnx.State) else s,
                        tree, is_leaf=lambda x: isinstance(x, nnx.State))


class NoCheckpointError(FileNotFoundError):
    """The work directory holds no checkpoint to resume or predict from."""


class Checkpointer:
    """Saves and restores `TrainState`s under `workdir/checkpoints`, keeping the last `keep`.

    Saving is synchronous: the train step donates the state's buffers right after, so the
    checkpoint must be on disk before the next step runs.
    """

    def __init__(self, workdir: str | Path, keep: int = 3, *, create: bool = True):
        self.workdir = Path(workdir).absolute()
        directory = self.workdir / CHECKPOINT_DIR
        if not create and not directory.is_dir():
            raise NoCheckpointError(
                f"no checkpoint in {self.workdir}; train first (python train.py --workdir "
                f"{self.workdir}) or point --workdir at a finished run"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=False
        )
        # The handler named up front: the metadata of a checkpoint is then readable before
        # anything was saved or restored in this process (see `_check_fits`).
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint on disk, None if there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every checkpoint on disk, oldest first."""
        return list(self.manager.all_steps())

    def save(self, state: TrainState, *, force: bool = True) -> int:
        """Writes `state` under its own step number; returns that step."""
        step = int(jax.device_get(state.step))
        if step in self.all_steps():  # an unreadable checkpoint that `restore` skipped
            damaged = self.workdir / CHECKPOINT_DIR / str(step)
            aside = damaged.with_name(f"{step}.unreadable.{time.strftime('%Y%m%d-%H%M%S')}")
            damaged.rename(aside)  # kept, not deleted: nothing on disk is thrown away
            self.manager.reload()
            print(f"warning: moved the unreadable checkpoint {damaged} to {aside.name} to "
                  f"save step {step} again", file=sys.stderr)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self.manager.wait_until_finished()
        return step

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """The state saved at `step` (default: the latest readable one, with a warning when a
        damaged newer one is skipped), with the structure of `like`."""
        if step is not None:
            return self._restore(like, step)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise NoCheckpointError(
                f"no checkpoint in {self.workdir / CHECKPOINT_DIR}; nothing to resume or "
                "predict from (train first, or drop --resume)"
            )
        first_error: Exception | None = None
        for candidate in steps:
            try:
                state = self._restore(like, candidate)
            except CheckpointMismatch as err:  # readable, another model: so are older ones
                raise ValueError(f"{err}; build the model the run was trained with (from "
                                 f"its {CONFIG_FILE}, if that was edited)") from None
            except Exception as err:  # damaged files surface as many error types
                first_error = first_error or err
                continue
            if first_error is not None:
                print(f"warning: checkpoint {steps[0]} in {self.workdir / CHECKPOINT_DIR} "
                      f"cannot be read ({_first_line(first_error)}); using step {candidate}",
                      file=sys.stderr)
            return state
        where = f"checkpoint {steps[0]} in {self.workdir / CHECKPOINT_DIR}"
        mismatch = not isinstance(first_error, json.JSONDecodeError)  # a truncated file
        if isinstance(first_error, ValueError) and mismatch:
            # orbax: the saved tree does not fit this model; its message says where
            raise ValueError(f"{where} does not fit the model built from {CONFIG_FILE} (was it "
                             f"edited?): {first_error}") from None
        raise ValueError(f"{where} cannot be read ({_first_line(first_error)}), nor any older "
                         "one") from first_error

    def restore_average(self, like: TrainState, count: int) -> tuple[TrainState, list[int]]:
        """(state, steps): the latest readable state (as `restore`) with its parameters
        replaced by their mean over the last `count` checkpoints up to it (`average_with`),
        and the steps averaged. `count=1`: the state itself."""
        check_average_count(count)
        return self.average_with(self.restore(like), count)

    def average_with(self, state: TrainState, count: int) -> tuple[TrainState, list[int]]:
        """(state, steps): `state` (the checkpoint of its step, in memory) with its parameters
        replaced by their mean with those of the checkpoints before it, `count` in all or
        fewer (with a warning on stderr) when fewer are on disk, and the steps averaged."""
        check_average_count(count)
        last = int(jax.device_get(state.step))
        if count == 1:
            return state, [last]
        steps = [s for s in sorted(self.all_steps()) if s < last][-(count - 1):] + [last]
        if len(steps) < count:
            print(f"warning: {self.workdir / CHECKPOINT_DIR} holds {len(steps)} checkpoint(s) "
                  f"up to step {last}, fewer than average_checkpoints={count}; using the mean "
                  "of those (a smaller --checkpoint-every writes more)", file=sys.stderr)
        if len(steps) == 1:
            return state, steps
        trees = [state.params]
        for step in steps[:-1]:
            try:
                trees.append(self._restore(state, step).params)
            except Exception as err:  # damaged files surface as many error types
                raise ValueError(
                    f"checkpoint {step} in {self.workdir / CHECKPOINT_DIR} cannot be read "
                    f"({_first_line(err)}); average fewer checkpoints "
                    f"(--average-checkpoints {len(steps) - 1 - steps.index(step)})"
                ) from None
        return state._replace(params=mean_params(trees)), steps

    def _check_fits(self, target, step: int) -> None:
        """CheckpointMismatch naming the first difference when the saved tree of `step`
        (read from its metadata, not its arrays) does not fit `target` in today's layout
        nor in the older one whose paths end in `value`; nothing when it fits or when the
        metadata cannot be read (then restoring says what is wrong)."""
        try:
            metadata = self.manager.item_metadata(step)
            saved = _shapes(metadata) if metadata is not None else None
        except Exception:  # noqa: BLE001 - damaged metadata: the restore reports it
            return
        if not saved:
            return
        want = _shapes(target)
        legacy = {path[:-1] if path and path[-1] == "value" else path: shape
                  for path, shape in saved.items()}
        if want in (saved, legacy):
            return
        saved = legacy if any(p and p[-1] == "value" for p in saved) else saved
        differ = ([f"{'/'.join(p)} is {saved[p]} there, {want[p]} here"
                   for p in want if p in saved and saved[p] != want[p]]
                  + [f"{'/'.join(p)} is missing there" for p in want if p not in saved]
                  + [f"{'/'.join(p)} is not in this model" for p in saved if p not in want])
        raise CheckpointMismatch(
            f"checkpoint {step} in {self.workdir / CHECKPOINT_DIR} does not fit this model "
            f"({len(differ)} difference(s), e.g. {differ[0]})")

    def _restore(self, like: TrainState, step: int) -> TrainState:
        target = abstract_train_state(like)
        self._check_fits(target, step)  # before orbax, whose failures are long and noisy
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except ValueError as err:  # orbax: the saved tree does not match the target
            # Saved before the state held plain arrays: parameters and Adam moments were
            # nnx.Param objects (one more `value` level in every path). Read that, drop it.
            try:
                restored = nnx.as_pure(self.manager.restore(
                    step, args=ocp.args.StandardRestore(_with_variables(target))))
            except ValueError:
                raise err from None  # neither layout: the first error says what differs
        return TrainState(*restored) if not isinstance(restored, TrainState) else restored

    def close(self) -> None:
        """Wait for pending writes and release the checkpoint manager."""
        self.manager.close()


class CheckpointMismatch(ValueError):
    """A readable checkpoint whose tree does not fit the state it is restored into."""


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path as key names: shape} of a state, or of a checkpoint's metadata (whose named
    tuples became dicts: both give the same names)."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {tuple(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_average_count(count) -> int:
    """`count` (checkpoints to average); ValueError unless a positive int."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"average_checkpoints must be a positive integer, got {count!r}")
    return count


def mean_params(trees: list[Any]) -> Any:
    """The leafwise mean of pytrees of the same structure (summed in float64, returned in
    each leaf's dtype): checkpoint averaging."""
    if not trees:
        raise ValueError("mean_params needs at least one tree")

    def mean(*leaves):
        total = np.zeros(np.shape(leaves[0]), np.float64)
        for leaf in leaves:
            total += np.asarray(leaf, np.float64)
        return jnp.asarray((total / len(leaves)).astype(np.asarray(leaves[0]).dtype))

    return jax.tree.map(mean, *trees)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def save_run_config(workdir: str | Path, model: TransformerConfig,
                    training: TrainingConfig) -> Path:
    """Writes `workdir/config.json` with both configs."""
    path = Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.to_dict(), "training": training.to_dict()}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_run_config(workdir: str | Path) -> tuple[TransformerConfig, TrainingConfig]:
    """The configs saved by `save_run_config`; a clear error if the file is missing."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise NoCheckpointError(
            f"no {CONFIG_FILE} in {workdir}; it is not a training work directory (train first)"
        )
    try:
        payload: dict[str, Any] = json.loads(path.read_text())
        return (TransformerConfig.from_dict(payload["model"]),
                TrainingConfig.from_dict(payload["training"]))
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{path} is damaged ({detail}); it should hold the 'model' and "
                         "'training' settings this program wrote") from None


def tokenizer_dir(workdir: str | Path) -> Path:
    """Where a run keeps its task's vocabularies: workdir/tokenizer."""
    return Path(workdir) / TOKENIZER_DIR
