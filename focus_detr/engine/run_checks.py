"""
Checks ``train_net.py`` makes before it writes anything into ``train.output_dir``, so that a run
never destroys what an earlier run wrote and never evaluates weights that do not fit.

* Training into a folder that holds checkpoints (``last_checkpoint`` or ``model_*.pth``) needs
  ``--resume``, or ``train.overwrite=True`` to train from scratch over them.
* ``--resume`` continues from the newest intact checkpoint (the one ``last_checkpoint`` names
  when it is intact, else the newest other one); when the folder holds checkpoints but none is
  intact, it stops instead of starting from zero over them.
* The checkpoint to resume from, and the weights ``--eval-only`` evaluates, must fit the model of
  the config exactly: same tensor names and shapes (:func:`weights_mismatch`).
* ``--eval-only`` into a run's folder keeps the run's ``config.yaml``
  (:func:`keep_run_config`).
"""

import contextlib
import glob
import logging
import os
import re
import shutil
import warnings
from typing import Iterator, List, Optional

import numpy as np
import torch
from detectron2.config import instantiate
from omegaconf import OmegaConf

from .checkpoint import SafeCheckpointer, find_intact_checkpoint
from .preflight import PreflightError

__all__ = [
    "RunDirError",
    "check_eval_weights",
    "check_run_dir",
    "check_weights_fit",
    "checkpoint_files",
    "keep_run_config",
    "weights_mismatch",
]

logger = logging.getLogger(__name__)


class RunDirError(PreflightError):
    """Training or evaluation would destroy an earlier run's files, or weights do not fit."""


def checkpoint_files(output_dir: str) -> List[str]:
    """``last_checkpoint`` and the ``model_*.pth`` files of ``output_dir``, sorted."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    files = glob.glob(os.path.join(glob.escape(output_dir), "model_*.pth"))
    last = os.path.join(output_dir, "last_checkpoint")
    return sorted(files + ([last] if os.path.isfile(last) else []))


def _names(paths: List[str], count: int = 4) -> str:
    names = [os.path.basename(path) for path in paths]
    return ", ".join(names[:count]) + (
        f" and {len(names) - count} more" if len(names) > count else ""
    )


def check_run_dir(cfg, *, resume: bool) -> Optional[str]:
    """
    The checkpoint a training run of ``cfg`` resumes from, or None when it starts from scratch
    (see the module doc). Reads ``train.output_dir`` and ``train.overwrite``; writes nothing.

    Raises:
        RunDirError: the folder holds checkpoints and neither ``resume`` nor
            ``train.overwrite``; or ``resume`` and none of them is intact, or the newest intact
            one does not fit the model of ``cfg``.
    """
    output_dir = cfg.train.output_dir
    existing = checkpoint_files(output_dir)
    if not existing:
        return None
    if not resume:
        if OmegaConf.select(cfg, "train.overwrite", default=False):
            logger.warning(
                f"train.overwrite=True: training from scratch in {output_dir}, over the "
                f"checkpoints of an earlier run ({_names(existing)})"
            )
            return None
        raise RunDirError(
            f"{output_dir} holds the checkpoints of an earlier run ({_names(existing)}); "
            f"nothing was written. Add --resume to continue that run, set train.output_dir to "
            f"another folder, or add train.overwrite=True to train from scratch over them"
        )
    checkpointer = SafeCheckpointer(torch.nn.Module(), output_dir)
    path = find_intact_checkpoint(checkpointer)
    if path is None:
        raise RunDirError(
            f"--resume: none of the checkpoints in {output_dir} ({_names(existing)}) is intact "
            f"(see the warnings above); nothing was written. Move them away to start from "
            f"scratch, or set train.output_dir to another folder"
        )
    last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
    if path != last:
        logger.warning(
            f"--resume: {os.path.join(output_dir, 'last_checkpoint')} "
            f"{'names ' + os.path.basename(last) if last else 'is missing'}: resuming from the "
            f"newest intact checkpoint, {path}"
        )
    check_weights_fit(
        cfg,
        path,
        advice=f"nothing was written to {output_dir}. Resume with the config of that run (its "
        f"config.yaml and overrides), or set train.output_dir to another folder",
    )
    return path


def _skeleton(cfg) -> torch.nn.Module:
    """``cfg.model`` without memory (meta tensors), or on the CPU when it cannot be built so."""
    try:
        with torch.device("meta"):
            return instantiate(cfg.model)
    except Exception:  # e.g. a backbone that reads a tensor's value while it is built
        with torch.random.fork_rng(devices=[]):
            return instantiate(cfg.model)


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
    r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)"
)


def _load(model: torch.nn.Module, weights: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.load_state_dict(weights, strict=False, assign=True)


def weights_mismatch(model: torch.nn.Module, checkpoint: dict, count: int = 3) -> Optional[str]:
    """
    What keeps ``checkpoint["model"]`` from loading into ``model`` exactly: tensors of other
    shapes, missing or unexpected names (after the model's own renaming of old names), or None.
    ``model`` is loaded with ``assign=True`` (pass a model built for the check).
    """
    weights = checkpoint.get("model")
    if not isinstance(weights, dict):
        return f"it has no 'model' state dict (got {type(weights).__name__})"
    weights = {
        (key[len("module.") :] if key.startswith("module.") else key): (
            torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        )
        for key, value in weights.items()
    }
    reshaped, incompatible = [], None
    try:
        incompatible = _load(model, weights)
    except RuntimeError as error:
        reshaped = _SIZE_MISMATCH.findall(str(error))
        if not reshaped:
            raise
        names = {key for key, _, _ in reshaped}
        try:  # again without them, for the missing and unexpected names
            incompatible = _load(model, {k: v for k, v in weights.items() if k not in names})
        except RuntimeError:
            pass  # renamed by the model's own migration: the shapes say enough
    problems = []
    if reshaped:
        shown = "; ".join(
            f"{key}: {a} in the checkpoint, {b} in the model" for key, a, b in reshaped[:count]
        )
        problems.append(f"{len(reshaped)} tensors of other shapes, e.g. {shown}")
    if incompatible is None:
        return "; ".join(problems)
    names = {key for key, _, _ in reshaped}
    # as detectron2's checkpointer: the normalization constants come from the config
    missing = [
        key
        for key in incompatible.missing_keys
        if key not in names and key not in ("pixel_mean", "pixel_std")
    ]
    for what, keys in (("missing", missing), ("unexpected", incompatible.unexpected_keys)):
        if keys:
            problems.append(f"{len(keys)} {what} tensors, e.g. {keys[:count]}")
    return "; ".join(problems) or None


class _FitChecker(SafeCheckpointer):
    """Reads a checkpoint as the real load does (URLs, ``.pkl``) and compares, loading nothing."""

    mismatch: Optional[str] = None

    def _load_model(self, checkpoint: dict):
        if not checkpoint.get("matching_heuristics", False):
            self.mismatch = weights_mismatch(self.model, checkpoint)
        return None  # nothing loaded, nothing to log


def check_weights_fit(cfg, path: str, *, advice: str) -> None:
    """
    Raise :class:`RunDirError` (naming ``path``, what does not fit, and ``advice``) unless the
    checkpoint ``path`` fits the model of ``cfg`` exactly. The model is built without memory
    where it can be; the checkpoint is read on the CPU. Checkpoints renamed by detectron2's
    matching heuristics (its model zoo's ``.pkl`` files) are not checked.
    """
    checker = _FitChecker(_skeleton(cfg))
    checker.load(path, checkpointables=[])
    if checker.mismatch:
        raise RunDirError(
            f"Checkpoint {path} does not fit the model of this config: {checker.mismatch}. "
            f"{advice}"
        )


def check_eval_weights(cfg, *, random_weights: bool = False) -> None:
    """
    ``--eval-only`` evaluates ``train.init_checkpoint``, which must be given and fit the model
    of ``cfg`` exactly; ``random_weights`` evaluates the model's initial weights instead (and
    then ``train.init_checkpoint`` must be empty). Raises :class:`RunDirError` otherwise.
    """
    path = cfg.train.init_checkpoint
    if random_weights:
        if path:
            raise RunDirError(
                f"--random-weights evaluates the initial weights, but train.init_checkpoint="
                f"{path} is given too: drop one of them"
            )
        logger.warning("--random-weights: evaluating the model's initial (untrained) weights")
        return
    if not path:
        raise RunDirError(
            "--eval-only needs the weights to evaluate: set train.init_checkpoint=PATH (or add "
            "--random-weights to evaluate the untrained model on purpose)"
        )
    if "://" not in path and not os.path.isfile(path):
        raise RunDirError(f"--eval-only: train.init_checkpoint={path} does not exist")
    check_weights_fit(
        cfg,
        path,
        advice="Evaluate it with the config it was trained with (the config.yaml of its run), or "
        "add --random-weights to evaluate the untrained model on purpose",
    )


@contextlib.contextmanager
def keep_run_config(output_dir: str, *, name: str = "config_eval.yaml") -> Iterator[None]:
    """
    Around detectron2's ``default_setup``, which writes the config to ``output_dir/config.yaml``:
    when that file exists (a training run's), it is kept as it was and the new config goes to
    ``output_dir/name`` instead. Nothing happens when ``output_dir`` has no config.yaml.
    """
    path = os.path.join(output_dir, "config.yaml") if output_dir else ""
    if not path or not os.path.isfile(path):
        yield
        return
    kept = f"{path}.kept-{os.getpid()}"
    shutil.copy2(path, kept)
    try:
        yield
    finally:
        if os.path.isfile(path):
            os.replace(path, os.path.join(output_dir, name))
        os.replace(kept, path)
