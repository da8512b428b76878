"""Training: loss, optimizer and schedules, jit-compiled steps, checkpoints, metrics, loop."""

from .config import RUN_PRESETS, TASK_PRESETS, RunPreset, TrainingConfig, resolve_preset
from .loop import train
from .loss import cross_entropy, cross_entropy_stats, token_accuracy
from .optim import make_optimizer, make_schedule, noam_schedule
from .parallel import DataParallel, data_parallel
from .runs import evaluate_run, predict
from .state import ModelParts, TrainState, init_model, init_train_state
from .step import check_batch, make_eval_step, make_train_step

__all__ = [
    "RUN_PRESETS", "TASK_PRESETS", "DataParallel", "ModelParts", "RunPreset", "TrainState",
    "TrainingConfig", "check_batch", "cross_entropy", "cross_entropy_stats", "data_parallel",
    "init_model", "init_train_state", "make_eval_step", "make_optimizer", "make_schedule",
    "make_train_step", "noam_schedule", "evaluate_run", "predict", "resolve_preset",
    "token_accuracy", "train",
]
