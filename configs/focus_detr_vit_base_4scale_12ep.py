# Focus-DETR ViT-B (ViTDet SimpleFeaturePyramid) 4-scale, 12 epochs on COCO 2017 (not measured
# here). MAE ImageNet-1k weights and the optimizer of detectron2's ViTDet configs: layer-wise lr
# decay 0.7 over the 12 blocks in place of the flat backbone lr x0.1 (the top block trains at
# 0.7 x lr, the patch embedding at 0.7^13 x lr, the feature pyramid and the transformer at lr),
# no weight decay on the position embeddings (ViTDet) and relative positions (MViTv2); the weight
# decay stays the DETR 1e-4. Large-scale-jitter data (1024 square) so that every image fits the
# backbone's square padding.
from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .common.data.coco_lsj import dataloader
from .common.models.focus_detr_vit_base import model
from .focus_detr_r50_4scale_12ep import lr_multiplier, optimizer, train

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {
    "pos_embed": {"weight_decay": 0.0},
    "rel_pos_h": {"weight_decay": 0.0},
    "rel_pos_w": {"weight_decay": 0.0},
}

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
train.output_dir = "./output/focus_detr_vit_base_4scale_12ep"
