from .checkpoint import CheckpointError, SafeCheckpointer, resume_advice
from .defaults import build_model, load_for_eval, wrap_ddp
from .ema import ModelEMA
from .hooks import BoundedHistoryHook, IterationSeedHook
from .nonfinite import NonFiniteLossError
from .precision import amp_from_config
from .preflight import PreflightError, check_output_dir, run_preflight
from .trainer import DETRTrainer

__all__ = [
    "BoundedHistoryHook",
    "CheckpointError",
    "DETRTrainer",
    "IterationSeedHook",
    "ModelEMA",
    "NonFiniteLossError",
    "PreflightError",
    "SafeCheckpointer",
    "amp_from_config",
    "build_model",
    "check_output_dir",
    "load_for_eval",
    "resume_advice",
    "run_preflight",
    "wrap_ddp",
]
