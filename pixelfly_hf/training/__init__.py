"""Training helpers for scripts in the style of transformers' *_no_trainer.py examples, as the recipes in recipes/
use them, one module per job:

    errors       RecipeError (a bad flag or input) and run_main, which reports it in one line and exits 1
    flags        the shared training and Pixelfly flags, their defaults and checks; the PixelflyConfig of the flags
    inputs       checks of model folders, model families, data files, dataset columns and Hub access
    accelerator  the Accelerator (compilation from --torch_compile, a seedable data order); the run's first line
    data         truncated splits, the training DataLoader
    sparsify     around get_model: calibration batches, a plan that does not fit as one error line, the printed plan
    optimizer    AdamW without decay on biases and norms, the learning-rate schedule, the step count
    loop         TrainingLoop: train, log, evaluate, checkpoint, resume, switch to dense, stop on time
    time_budget  TimeBudget: training time, evaluation excluded, against --max_train_minutes
    densify      DensifySchedule and densify: sparse, then dense (--densify_at)
    dense_rate   time_dense_steps: the same model's dense training rate, timed beside the run (--compare_dense_steps)
    checkpoints  atomic, resumable checkpoints
    train_log    train_log.jsonl and accelerate's trackers
    finish       the saved model, all_results.json, the printed summary; model_card (README.md) and hub (the push)

The names below are re-exported here; `from pixelfly_hf.training import TimeBudget` is the short way in.
"""
from .accelerator import announce, compile_plugin, make_accelerator
from .checkpoints import find_checkpoint, read_checkpoint_state, save_checkpoint
from .data import limit_samples, make_train_dataloader
from .dense_rate import time_dense_steps
from .densify import DensifySchedule, densify
from .errors import RecipeError, run_main
from .finish import finish
from .flags import (ArgumentParser, add_pixelfly_args, add_training_args, check_args, default_output_dir,
                    pixelfly_config, resolve_defaults)
from .inputs import check_column, check_data_file, check_model_folder, hub_access, load_model_config
from .loop import TrainingLoop
from .optimizer import make_optimizer, make_scheduler
from .sparsify import calibration_batches, plan_must_fit, print_plan
from .time_budget import TimeBudget
from .train_log import TrainLog, init_tracking

__all__ = [
    "announce", "compile_plugin", "make_accelerator", "find_checkpoint", "read_checkpoint_state", "save_checkpoint",
    "limit_samples", "make_train_dataloader", "DensifySchedule", "densify", "RecipeError", "run_main", "finish",
    "ArgumentParser", "add_pixelfly_args", "add_training_args", "check_args", "default_output_dir",
    "pixelfly_config", "resolve_defaults", "check_column", "check_data_file", "check_model_folder", "hub_access",
    "load_model_config", "TrainingLoop", "make_optimizer", "make_scheduler", "calibration_batches", "plan_must_fit",
    "print_plan", "TimeBudget", "TrainLog", "init_tracking", "time_dense_steps",
]
