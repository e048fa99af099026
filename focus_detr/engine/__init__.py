from .checkpoint import CheckpointError, SafeCheckpointer
from .data_loader import SampleLoadError, build_resumable_train_loader
from .ema import ModelEMA
from .hooks import AllocatorPurgeHook, BoundedHistoryHook, IterationSeedHook
from .nonfinite import NonFiniteLossError
from .preflight import PreflightError, run_preflight
from .train_loop import build_model, do_test, do_train, load_for_eval, wrap_ddp
from .trainer import DETRTrainer

__all__ = [
    "AllocatorPurgeHook",
    "BoundedHistoryHook",
    "CheckpointError",
    "DETRTrainer",
    "IterationSeedHook",
    "ModelEMA",
    "NonFiniteLossError",
    "PreflightError",
    "SafeCheckpointer",
    "SampleLoadError",
    "build_model",
    "build_resumable_train_loader",
    "do_test",
    "do_train",
    "load_for_eval",
    "run_preflight",
    "wrap_ddp",
]
