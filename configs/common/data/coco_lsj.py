# COCO 2017 with ViTDet's large-scale jitter (detectron2 projects/ViTDet common/coco_loader_lsj.py):
# flip, resize to 0.1x..2.0x of a 1024 x 1024 box, crop to at most 1024 x 1024; test images are
# resized so the longer side is 1024. Every image fits a backbone's 1024 square padding
# (`SimpleFeaturePyramid(square_pad=1024)`), which the DETR augmentation (up to 1333) does not.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .coco_detr import dataloader

IMAGE_SIZE = 1024

dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=IMAGE_SIZE, target_width=IMAGE_SIZE
    ),
    L(T.FixedSizeCrop)(crop_size=(IMAGE_SIZE, IMAGE_SIZE), pad=False),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE),
]
