"""A training data loader that continues where a resumed run stopped."""

import itertools
from typing import Optional

from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

__all__ = ["ResumableTrainingSampler", "build_resumable_train_loader"]


class ResumableTrainingSampler(TrainingSampler):
    """
    detectron2's infinite :class:`TrainingSampler` started ``start_index`` samples into its global
    stream: a run resumed at iteration ``i`` with ``start_index = i * total_batch_size`` sees the
    samples an uninterrupted run would have seen.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: Optional[int] = None,
        start_index: int = 0,
    ):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self._start_index = start_index

    def __iter__(self):
        yield from itertools.islice(
            self._infinite_indices(), self._start_index + self._rank, None, self._world_size
        )


def build_resumable_train_loader(loader_cfg, *, start_iter: int = 0, seed: Optional[int] = None):
    """
    Instantiate a ``build_detection_train_loader`` LazyConfig node with a
    :class:`ResumableTrainingSampler` that skips the samples of iterations before ``start_iter``.

    The resumed batches are exactly those of an uninterrupted run only without aspect-ratio
    grouping (``aspect_ratio_grouping=False``: the grouping holds images back for later batches,
    and a checkpoint does not keep them) and, for random augmentations, without loader workers
    (their random states are not checkpointed).

    Args:
        loader_cfg: the ``dataloader.train`` config node (``dataset``, ``mapper``,
            ``total_batch_size``, ...). A ``sampler`` given there is kept as it is.
        start_iter: the first iteration the loader serves.
        seed: shuffling seed shared by all processes; None draws one shared seed.
    """
    kwargs = {key: instantiate(value) for key, value in loader_cfg.items() if key != "_target_"}
    if kwargs.get("sampler") is None:
        dataset = kwargs["dataset"]
        kwargs["sampler"] = ResumableTrainingSampler(
            len(dataset),
            seed=seed if seed is not None and seed >= 0 else comm.shared_random_seed(),
            start_index=start_iter * int(kwargs["total_batch_size"]),
        )
    return build_detection_train_loader(**kwargs)
