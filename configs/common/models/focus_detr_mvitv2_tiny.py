# Focus-DETR with an MViTv2-T backbone (detectron2 `MViT`, as detectron2's
# projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py): scale3-scale5 (192/384/768 channels,
# strides 8/16/32) + one stride-2 level from the neck = 4 levels, strides 8/16/32/64.
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.modeling import MViT
from torch import nn

from .focus_detr_r50 import model

model.backbone = L(MViT)(
    embed_dim=96,
    depth=10,
    num_heads=1,
    last_block_indexes=(0, 2, 7, 9),
    residual_pooling=True,
    drop_path_rate=0.2,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    out_features=("scale3", "scale4", "scale5"),
)
model.neck.in_features = ["scale3", "scale4", "scale5"]
model.neck.num_extra_levels = 1
