# Focus-DETR with a plain ViT-B/16 backbone through detectron2's `SimpleFeaturePyramid` (ViTDet,
# as detectron2's common/models/mask_rcnn_vitdet.py): the stride-16 ViT map is turned into
# p3/p4/p5 (scale factors 2, 1, 1/2; 256 channels, strides 8/16/32) and the neck adds one
# stride-2 level = 4 levels, strides 8/16/32/64. ViTDet's stride-4 level (scale factor 4) is
# left out: it would quadruple the encoder tokens.
#
# Inputs are zero-padded to a fixed 1024 x 1024 square (`square_pad`), which FocusDETR honours
# through `backbone.padding_constraints`; every image must therefore fit in 1024 x 1024, which
# the large-scale-jitter data of configs/common/data/coco_lsj.py guarantees (the DETR
# augmentation, up to 1333 pixels, does not).
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.modeling import SimpleFeaturePyramid, ViT
from torch import nn

from .focus_detr_r50 import model

model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        # global attention in blocks 2, 5, 8, 11; 14 x 14 windows elsewhere
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(2.0, 1.0, 0.5),
    top_block=None,
    norm="LN",
    square_pad=1024,
)
model.neck.in_features = ["p3", "p4", "p5"]
model.neck.num_extra_levels = 1
