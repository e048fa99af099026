"""
detectron2's checkpointer with atomic writes and clear errors for checkpoints that do not fit.

* ``model_*.pth`` and ``last_checkpoint`` are written to ``NAME.partial`` in the same folder,
  flushed to disk (fsync) and renamed over ``NAME``: a kill during a save leaves the previous
  checkpoint and ``last_checkpoint`` as they were (and at most a ``.partial`` file, removed by
  the next save).
* A truncated or corrupt file raises :class:`CheckpointError` naming it, not a pickle traceback.
* A checkpoint of which no tensor fits the model (another architecture) raises
  :class:`CheckpointError`; partial matches are logged as detectron2 does (missing and unexpected
  keys), and tensors of another shape (e.g. class heads of another number of classes) keep their
  initial values with one warning naming them all.
"""

import glob
import logging
import os
from typing import IO, Any, Callable, Dict, List, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "CheckpointError",
    "SafeCheckpointer",
    "atomic_write",
    "find_intact_checkpoint",
    "resume_advice",
]

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or nothing in it fits the model."""


def _fsync_directory(path: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """
    Write a file so that ``path`` is either its previous version or the complete new one: call
    ``write`` on ``path + ".partial"`` (same folder, so the rename stays on one file system),
    flush and fsync it, rename it over ``path`` and fsync the folder.
    """
    temporary = path + PARTIAL_SUFFIX
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _is_local(path: str) -> bool:
    # iopath handlers of remote storage are selected by a "scheme://" prefix
    return "://" not in path


class SafeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with the behaviour described in the module doc."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            # remote storage (iopath): its own upload semantics apply
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        for stale in glob.glob(os.path.join(glob.escape(self.save_dir), "*" + PARTIAL_SUFFIX)):
            os.remove(stale)  # left by a process killed while saving
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode("utf-8")),
        )

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        if path and _is_local(path):
            file_path = urlparse(path)._replace(query="").geturl()
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"Checkpoint {file_path} not found")
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            # detectron2 resets it only after a successful load; a failed one must not block
            # the next
            self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except Exception as error:
            summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if "weights only" in str(error).lower():
                reason = "it holds Python objects that torch.load(weights_only=True) refuses"
            else:
                reason = "the file is truncated, corrupt or not a PyTorch checkpoint"
            size = os.path.getsize(filename) if os.path.isfile(filename) else "?"
            raise CheckpointError(
                f"Cannot load checkpoint {filename} ({size} bytes): {reason} ({summary})"
            ) from error

    def _load_model(self, checkpoint: Dict[str, Any]):
        self._check_something_fits(checkpoint)
        return super()._load_model(checkpoint)

    def _check_something_fits(self, checkpoint: Dict[str, Any]) -> None:
        if checkpoint.get("matching_heuristics", False):
            return  # renamed by detectron2's matching heuristics, which log their own table
        weights = checkpoint.get("model")
        if not isinstance(weights, dict):
            raise CheckpointError(
                f"Checkpoint {self._path()} has no 'model' state dict (got {type(weights)})"
            )
        model_state = self.model.state_dict()
        fitting = 0
        for key, value in weights.items():
            key = key[len("module.") :] if key.startswith("module.") else key
            target = model_state.get(key)
            if target is not None and tuple(getattr(value, "shape", ())) == tuple(target.shape):
                fitting += 1
        if model_state and fitting == 0:
            raise CheckpointError(
                f"No tensor of checkpoint {self._path()} fits the model: is it a checkpoint of "
                f"another architecture? Checkpoint keys {_sample(weights)}, model keys "
                f"{_sample(model_state)}"
            )

    def _path(self) -> str:
        parsed = getattr(self, "_parsed_url_during_load", None)
        return parsed.geturl() if parsed is not None else "(unknown file)"

    def _log_incompatible_keys(self, incompatible) -> None:
        reshaped = [key for key, _, _ in incompatible.incorrect_shapes]
        if reshaped:
            shapes = "; ".join(
                f"{key}: {tuple(checkpoint)} in the checkpoint, {tuple(model)} in the model"
                for key, checkpoint, model in incompatible.incorrect_shapes
            )
            self.logger.warning(
                f"{len(reshaped)} tensors have other shapes in the checkpoint (another number "
                f"of classes?) and keep their initial values: {shapes}"
            )
        # those tensors are also "missing" from what was loaded: logged once above
        missing = [key for key in incompatible.missing_keys if key not in set(reshaped)]
        super()._log_incompatible_keys(
            incompatible._replace(missing_keys=missing, incorrect_shapes=[])
        )


def _sample(keys, count: int = 5) -> str:
    keys = list(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > count else ""
    return str(keys[:count])[:-1] + more + "]"


def find_intact_checkpoint(checkpointer: SafeCheckpointer) -> Optional[str]:
    """
    The newest checkpoint of ``checkpointer.save_dir`` that loads and whose model tensors are
    all finite: the one ``last_checkpoint`` names when it is intact, else the newest (by
    modification time) other ``.pth`` file that is; ``.pth`` files without a ``model`` state
    dict are not checkpoints. None when there is none.
    """
    candidates = []
    if checkpointer.has_checkpoint():
        candidates.append(checkpointer.get_checkpoint_file())
    others = sorted(checkpointer.get_all_checkpoint_files(), key=os.path.getmtime, reverse=True)
    candidates += [path for path in others if path not in candidates]
    for path in candidates:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            logger.warning(f"Checkpoint {path} is not intact: {type(error).__name__}: {error}")
            continue
        weights = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        if not isinstance(weights, dict):
            continue  # another .pth file of the folder (e.g. the evaluator's predictions)
        if all(torch.isfinite(v).all() for v in weights.values() if torch.is_floating_point(v)):
            return path
        logger.warning(f"Checkpoint {path} has NaN or infinite weights")
    return None


def resume_advice(checkpointer: SafeCheckpointer) -> str:
    """Which checkpoint of a stopped run ``--resume`` continues from (checked to be intact)."""
    path = find_intact_checkpoint(checkpointer)
    if path is None:
        return f"No intact checkpoint in {checkpointer.save_dir}: a new run starts from scratch"
    last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
    if path == last:
        return f"The last checkpoint {path} is intact: --resume continues from it"
    return (
        f"The newest intact checkpoint is {path}: write its file name into "
        f"{checkpointer.save_dir}/last_checkpoint, then --resume continues from it"
    )
