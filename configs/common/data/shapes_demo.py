# The built-in synthetic shapes dataset (focus_detr.data), resized to a long side of 192 pixels:
# 0.6 x the 320 pixels its object sizes are defined at (configs scale the foreground ranges).
# The loaders and the COCOEvaluator are those of coco_detr.py with other datasets and resizing.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

import focus_detr.data  # noqa: F401  (registers focus_detr_shapes_{train,val})

from .coco_detr import dataloader

dataloader.train.dataset.names = "focus_detr_shapes_train"
dataloader.train.dataset.filter_empty = False
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(),
    L(T.ResizeShortestEdge)(short_edge_length=192, max_size=192),
]
dataloader.train.total_batch_size = 8
# The small images are mapped in the main process: on 2 cores a loader worker process competes
# with the compute threads and slows the training step down.
dataloader.train.num_workers = 0

dataloader.test.dataset.names = "focus_detr_shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=192, max_size=192)
]
dataloader.test.num_workers = 1
