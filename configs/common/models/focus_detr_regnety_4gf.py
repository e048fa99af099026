# Focus-DETR with a RegNetY-4.0GF backbone (detectron2 `RegNet`, the DDS baseline of
# detectron2's mask_rcnn_regnety_4gf_dds_fpn_1x.py): s2-s4 (192/512/1088 channels, strides
# 8/16/32) + one stride-2 level from the neck = 4 levels, strides 8/16/32/64.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import RegNet
from detectron2.modeling.backbone.regnet import ResBottleneckBlock, SimpleStem

from .focus_detr_r50 import model

model.backbone = L(RegNet)(
    stem_class=SimpleStem,
    stem_width=32,
    block_class=ResBottleneckBlock,
    depth=22,
    w_a=31.41,
    w_0=96,
    w_m=2.24,
    group_width=64,
    se_ratio=0.25,
    freeze_at=2,
    norm="FrozenBN",
    out_features=["s2", "s3", "s4"],
)
model.neck.in_features = ["s2", "s3", "s4"]
model.neck.num_extra_levels = 1

# The pycls ImageNet weights expect BGR input normalized with the BGR ImageNet mean and std (as
# detectron2's RegNet configs); the experiment file sets the data mappers to BGR to match.
model.input_format = "BGR"
model.pixel_mean = [103.530, 116.280, 123.675]
model.pixel_std = [57.375, 57.120, 58.395]
