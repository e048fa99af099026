# Focus-DETR with a Swin-T backbone (detectron2 `SwinTransformer`, ImageNet-1k 224 weights):
# p1-p3 (192/384/768 channels, strides 8/16/32) + one stride-2 level from the neck = 4 levels,
# strides 8/16/32/64. Swin-S/B/L change the widths, depths and window size below.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import SwinTransformer

from .focus_detr_r50 import model

model.backbone = L(SwinTransformer)(
    pretrain_img_size=224,
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
    drop_path_rate=0.1,
    out_indices=(1, 2, 3),
)
model.neck.in_features = ["p1", "p2", "p3"]
model.neck.num_extra_levels = 1
