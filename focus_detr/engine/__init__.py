from .data_loader import ResumableTrainingSampler, build_resumable_train_loader
from .ema import ModelEMA
from .hooks import RNGStateHook
from .train_loop import build_model, do_test, do_train, load_for_eval, wrap_ddp
from .trainer import DETRTrainer

__all__ = [
    "DETRTrainer",
    "ModelEMA",
    "RNGStateHook",
    "ResumableTrainingSampler",
    "build_model",
    "build_resumable_train_loader",
    "do_test",
    "do_train",
    "load_for_eval",
    "wrap_ddp",
]
