"""
A training data loader whose batches depend on the run seed and the iteration only, so that a
run resumed at iteration ``i`` (even after SIGKILL) gets the batches an uninterrupted run got.

It replaces the middle of detectron2's ``build_detection_train_loader`` and keeps its config
(``dataset``, ``mapper``, ``sampler``, ``total_batch_size``, ``aspect_ratio_grouping``,
``num_workers``, ``collate_fn``):

* batch composition is decided on dataset indices (:class:`TrainingBatchIndices`): the sampler's
  index stream grouped by aspect ratio, read from the records' ``width``/``height`` as detectron2's
  ``AspectRatioGroupedDataset`` does. A resumed run replays this integer stream up to its
  iteration, so images held back in a half-full aspect-ratio bucket are not lost;
* each sample is mapped under random states seeded from ``(run seed, global sample position)``
  (:class:`SeededBatchDataset`), so its augmentation does not depend on which loader worker maps
  it or on what that worker mapped before;
* batch ``k`` of a process is mapped by loader worker ``k % num_workers`` and the batches come
  back in order.
"""

import itertools
import logging
from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from detectron2.utils.registry import locate
from torch.utils.data import IterableDataset, get_worker_info

from .mapper import SampleLoadError
from .seeding import SAMPLE_STREAM, derive_seed, seeded_cpu_rngs

__all__ = [
    "SampleLoadError",
    "SeededBatchDataset",
    "TrainingBatchIndices",
    "aspect_ratio_groups",
    "build_resumable_train_loader",
]

logger = logging.getLogger(__name__)

# (global sample position, dataset index)
IndexedSample = Tuple[int, int]


def aspect_ratio_groups(records: Sequence[Dict]) -> List[int]:
    """Per record 0 when ``width > height``, else 1 (detectron2's two aspect-ratio groups)."""
    groups = []
    for index, record in enumerate(records):
        if "width" not in record or "height" not in record:
            raise ValueError(
                f"aspect_ratio_grouping needs 'width' and 'height' in every dataset record; "
                f"record {index} ({record.get('file_name', 'no file_name')}) has "
                f"{sorted(record)}: set dataloader.train.aspect_ratio_grouping=False"
            )
        groups.append(0 if record["width"] > record["height"] else 1)
    return groups


class TrainingBatchIndices:
    """
    The infinite batches of one process, each a list of ``batch_size`` ``(position, index)``.

    The ``k``-th index that ``sampler`` gives this process has the global position
    ``rank + k * world_size`` (detectron2's samplers give process ``r`` every ``world_size``-th
    element of one shared stream): positions are unique across processes and do not depend on
    batching. With ``group_ids`` the indices are batched per group in arrival order (a batch is
    emitted when its group has ``batch_size`` indices), as ``AspectRatioGroupedDataset`` does.

    Iteration starts at batch ``start_iter``: the batches before it are replayed on integers only
    (no image is read), so the groups' pending indices are those of an uninterrupted run.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Optional[Sequence[int]] = None,
        start_iter: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.group_ids = group_ids
        self.start_iter = start_iter

    def __iter__(self) -> Iterator[List[IndexedSample]]:
        buckets: Dict[int, List[IndexedSample]] = defaultdict(list)
        emitted = 0
        for k, index in enumerate(self.sampler):
            index = int(index)
            group = 0 if self.group_ids is None else self.group_ids[index]
            bucket = buckets[group]
            bucket.append((self.rank + k * self.world_size, index))
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                emitted += 1
                if emitted > self.start_iter:
                    yield batch


def _identity(batch):
    return batch


class SeededBatchDataset(IterableDataset):
    """
    Maps the batches of a :class:`TrainingBatchIndices`; in loader worker ``w`` of ``n`` only
    batches ``w, w + n, ...``. Sample ``(position, index)`` is mapped with Python's, NumPy's
    and torch's CPU generators seeded from ``(seed, position)``. A mapper returning None (a
    sample it drops) is retried on an index of the same aspect-ratio group drawn from
    ``(seed, position, attempt)``. A mapper error is raised as :class:`SampleLoadError` naming
    the sample's ``file_name``.
    """

    def __init__(
        self,
        dataset,
        mapper: Callable[[Dict], Optional[Dict]],
        batch_indices: TrainingBatchIndices,
        *,
        seed: int,
        collate_fn: Optional[Callable] = None,
    ):
        super().__init__()
        self.dataset = dataset
        self.mapper = mapper
        self.batch_indices = batch_indices
        self.seed = seed
        self.collate_fn = collate_fn
        groups = batch_indices.group_ids
        self._group_members: Dict[int, List[int]] = defaultdict(list)
        for index in range(len(dataset)):
            self._group_members[0 if groups is None else groups[index]].append(index)

    def __iter__(self):
        batches: Iterable[List[IndexedSample]] = self.batch_indices
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            batches = itertools.islice(batches, worker.id, None, worker.num_workers)
        for batch in batches:
            mapped = [self.map_sample(position, index) for position, index in batch]
            yield mapped if self.collate_fn is None else self.collate_fn(mapped)

    def map_sample(self, position: int, index: int):
        """The mapped sample at global ``position`` (dataset ``index``); see the class doc."""
        group = None
        for attempt in itertools.count():
            record = self.dataset[index]
            with seeded_cpu_rngs(derive_seed(self.seed, SAMPLE_STREAM, position, attempt)):
                try:
                    mapped = self.mapper(record)
                except SampleLoadError:
                    raise  # names the file already
                except Exception as error:
                    name = record.get("file_name", "(no file_name)")
                    raise SampleLoadError(
                        f"Failed to load training image {name} (dataset index {index}): "
                        f"{type(error).__name__}: {error}"
                    ) from error
            if mapped is not None:
                return mapped
            if attempt >= 2:
                logger.warning(f"The mapper dropped {attempt + 1} samples in a row at {position}")
            if group is None:
                groups = self.batch_indices.group_ids
                group = 0 if groups is None else groups[index]
            members = self._group_members[group]
            draw = derive_seed(self.seed, SAMPLE_STREAM, position, attempt, len(members))
            index = members[draw % len(members)]


def _is_detectron2_train_loader(loader_cfg) -> bool:
    target = loader_cfg.get("_target_")
    if isinstance(target, str):
        target = locate(target)
    return target is build_detection_train_loader


def build_resumable_train_loader(
    loader_cfg, *, seed: int, start_iter: int = 0, dataset: Optional[Sequence[Dict]] = None
) -> Iterable[list]:
    """
    Build the ``dataloader.train`` config node (a ``build_detection_train_loader`` call) as a
    loader whose batch ``i`` depends only on ``seed`` and ``i`` (see the module doc), starting at
    batch ``start_iter``.

    Args:
        loader_cfg: the ``dataloader.train`` config node. A ``sampler`` given there is used as
            the index stream (it must be deterministic, i.e. seeded, for exact resumes);
            otherwise a ``TrainingSampler`` seeded with ``seed``.
        seed: the run seed, the same in every process.
        start_iter: the first iteration the loader serves.
        dataset: the already loaded dataset (the config's ``dataset`` is then not instantiated).

    Other loader builders, and iterable datasets, are built as the config says: a resumed run
    then starts their data stream anew (logged as a warning).
    """
    if not _is_detectron2_train_loader(loader_cfg):
        logger.warning(
            "dataloader.train is not build_detection_train_loader: built as configured; a "
            "resumed run restarts its data stream"
        )
        return instantiate(loader_cfg)
    kwargs = {
        key: instantiate(value)
        for key, value in loader_cfg.items()
        if key != "_target_" and not (key == "dataset" and dataset is not None)
    }
    if dataset is None:
        dataset = kwargs.pop("dataset")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        logger.warning("dataloader.train.dataset is iterable: a resumed run restarts its stream")
        return build_detection_train_loader(dataset, **kwargs)
    mapper = kwargs.pop("mapper")
    sampler = kwargs.pop("sampler", None)
    total_batch_size = int(kwargs.pop("total_batch_size"))
    grouping = kwargs.pop("aspect_ratio_grouping", True)
    num_workers = int(kwargs.pop("num_workers", 0))
    collate_fn = kwargs.pop("collate_fn", None)
    world_size, rank = comm.get_world_size(), comm.get_rank()
    if total_batch_size < 1 or total_batch_size % world_size != 0:
        raise ValueError(
            f"total_batch_size {total_batch_size} must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    group_ids = aspect_ratio_groups(dataset) if grouping else None
    if isinstance(dataset, list):
        # serialized: loader workers read it without copy-on-access memory growth
        dataset = DatasetFromList(dataset, copy=False, serialize=True)
    if sampler is None:
        sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed)
    batch_indices = TrainingBatchIndices(
        sampler,
        batch_size=total_batch_size // world_size,
        rank=rank,
        world_size=world_size,
        group_ids=group_ids,
        start_iter=start_iter,
    )
    stream = SeededBatchDataset(dataset, mapper, batch_indices, seed=seed, collate_fn=collate_fn)
    logger.info(
        f"Training loader: {total_batch_size // world_size} images per process, "
        f"{'aspect-ratio groups' if grouping else 'no grouping'}, {num_workers} workers, "
        f"starting at iteration {start_iter} (seed {seed})"
    )
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        # the workers' own seeds come from here, not from torch's global generator
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
