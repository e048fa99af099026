"""
The resumable training loader (focus_detr.data.train_loader): batch ``i`` depends only on the
run seed and ``i``, whatever the number of loader workers and wherever the run was resumed.
"""

import itertools
import random
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from helpers import tiny_train_config

from focus_detr.data.train_loader import (
    SampleLoadError,
    SeededBatchDataset,
    TrainingBatchIndices,
    aspect_ratio_groups,
    build_resumable_train_loader,
)


def _stream(start_iter=0, *, rank=0, world_size=1, groups=None, batch_size=3, seed=0):
    from detectron2.data.samplers import TrainingSampler

    sampler = TrainingSampler(10, seed=seed)
    sampler._rank, sampler._world_size = rank, world_size  # what comm would say in process rank
    return TrainingBatchIndices(
        sampler,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        group_ids=groups,
        start_iter=start_iter,
    )


def _take(stream, count):
    return list(itertools.islice(iter(stream), count))


@pytest.mark.parametrize("groups", [None, [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]])
def test_batch_indices_resumed_at_any_iteration_equal_the_uninterrupted_ones(groups):
    uninterrupted = _take(_stream(groups=groups), 12)
    for start in (1, 5, 11):
        assert _take(_stream(start, groups=groups), 12 - start) == uninterrupted[start:]
    if groups is not None:
        # every batch is of one aspect-ratio group, and the groups interleave: indices wait in
        # a half-full bucket across batches, which the replay restores
        assert all(len({groups[i] for _, i in batch}) == 1 for batch in uninterrupted)
        assert len({groups[batch[0][1]] for batch in uninterrupted}) == 2
    positions = [p for batch in uninterrupted for p, _ in batch]
    assert len(set(positions)) == len(positions)


def test_batch_indices_give_each_process_its_own_positions():
    per_rank = [[p for b in _take(_stream(rank=r, world_size=2), 4) for p, _ in b] for r in (0, 1)]
    assert all(p % 2 == 0 for p in per_rank[0]) and all(p % 2 == 1 for p in per_rank[1])
    with pytest.raises(ValueError, match="rank must be in"):
        _stream(rank=2, world_size=2)


def test_aspect_ratio_groups_need_width_and_height():
    assert aspect_ratio_groups([{"width": 5, "height": 3}, {"width": 3, "height": 3}]) == [0, 1]
    with pytest.raises(ValueError, match="b.png"):
        aspect_ratio_groups([{"width": 5, "height": 3}, {"file_name": "b.png"}])


def _random_mapper(record):
    # draws from all three global generators, as augmentations and mappers may
    return (record["i"], random.random(), float(np.random.rand()), float(torch.rand(())))


def test_samples_are_mapped_from_their_position_and_leave_the_global_streams_alone():
    records = [{"i": i, "width": 4, "height": 3} for i in range(6)]
    stream = SeededBatchDataset(records, _random_mapper, _stream(batch_size=2), seed=7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = stream.map_sample(position=11, index=2)
    stream.map_sample(position=12, index=2)
    assert stream.map_sample(position=11, index=2) == first  # whatever was mapped before
    assert stream.map_sample(position=12, index=2) != first
    assert SeededBatchDataset(records, _random_mapper, _stream(), seed=8).map_sample(11, 2) != first
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_dropped_samples_are_replaced_deterministically_from_the_same_group():
    records = [{"i": i, "width": 4 if i % 2 else 2, "height": 3} for i in range(8)]

    def drop_index_3(record):
        return None if record["i"] == 3 else _random_mapper(record)

    groups = aspect_ratio_groups(records)
    stream = SeededBatchDataset(records, drop_index_3, _stream(groups=groups), seed=0)
    replacement = stream.map_sample(position=4, index=3)
    assert replacement[0] != 3 and groups[replacement[0]] == groups[3]
    assert stream.map_sample(position=4, index=3) == replacement


def _batches(cfg, count, **kwargs):
    loader = build_resumable_train_loader(cfg.dataloader.train, seed=0, **kwargs)
    return [
        [(d["file_name"], d["image"], d["instances"].gt_boxes.tensor) for d in batch]
        for batch in itertools.islice(loader, count)
    ]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for got_batch, expected_batch in zip(got, expected):
        assert [g[0] for g in got_batch] == [e[0] for e in expected_batch]
        for g, e in zip(got_batch, expected_batch):
            assert torch.equal(g[1], e[1]) and torch.equal(g[2], e[2]), g[0]


def test_loader_batches_do_not_depend_on_workers_or_on_where_the_run_resumed(shapes, tmp_path):
    cfg = tiny_train_config(tmp_path, shapes.names, flip=True)
    cfg.dataloader.train.aspect_ratio_grouping = True
    reference = _batches(cfg, 6)
    # random flips happened (the augmentation is exercised), in both directions
    flips = {
        torch.equal(s[1], reference[0][0][1])
        for b in reference
        for s in b
        if s[0] == reference[0][0][0]
    }
    assert flips == {True, False}
    cfg.dataloader.train.num_workers = 2
    _assert_same_batches(_batches(cfg, 6), reference)
    _assert_same_batches(_batches(cfg, 3, start_iter=3), reference[3:])


def test_a_corrupt_image_met_in_a_worker_is_named(shapes, tmp_path):
    records = DatasetCatalog.get(shapes.names["train"])
    broken = tmp_path / "broken.png"
    shutil.copy(records[0]["file_name"], broken)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # header intact, pixels cut off
    records = [dict(r, file_name=str(broken)) for r in records]
    cfg = tiny_train_config(tmp_path, shapes.names)
    cfg.dataloader.train.num_workers = 1
    loader = build_resumable_train_loader(cfg.dataloader.train, seed=0, dataset=records)
    with pytest.raises(SampleLoadError, match="broken.png"):
        next(iter(loader))
