from .checkpoint import CheckpointError, SafeCheckpointer, resume_advice
from .defaults import (
    FileNamingModel,
    InferenceError,
    build_model,
    load_for_eval,
    on_main_process,
    wrap_ddp,
)
from .ema import ModelEMA
from .hooks import BoundedHistoryHook, IterationSeedHook
from .nonfinite import NonFiniteLossError
from .overrides import ConfigOverrideError, apply_overrides
from .precision import amp_from_config
from .preflight import PreflightError, check_output_dir, run_preflight
from .run_checks import RunDirError, check_eval_weights, check_run_dir, keep_run_config
from .signals import (
    StopOnSignalHook,
    TrainingInterrupted,
    forward_stop_signals_to_children,
    ignore_stop_signals_in_workers,
)
from .trainer import DETRTrainer

__all__ = [
    "BoundedHistoryHook",
    "CheckpointError",
    "ConfigOverrideError",
    "DETRTrainer",
    "FileNamingModel",
    "InferenceError",
    "IterationSeedHook",
    "ModelEMA",
    "NonFiniteLossError",
    "PreflightError",
    "RunDirError",
    "SafeCheckpointer",
    "StopOnSignalHook",
    "TrainingInterrupted",
    "amp_from_config",
    "apply_overrides",
    "build_model",
    "check_eval_weights",
    "check_output_dir",
    "check_run_dir",
    "forward_stop_signals_to_children",
    "ignore_stop_signals_in_workers",
    "keep_run_config",
    "load_for_eval",
    "on_main_process",
    "resume_advice",
    "run_preflight",
    "wrap_ddp",
]
