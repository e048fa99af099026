# Focus-DETR Swin-T 4-scale, 12 epochs on COCO 2017 (the paper reports 50.0 box AP). The R50
# recipe (AdamW 1e-4, backbone lr x0.1) with the official ImageNet-1k Swin-T weights; the
# checkpoint's names ("layers.0.blocks.0...") are matched to "backbone.*" by detectron2's
# matching heuristics.
from .common.models.focus_detr_swin_tiny import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

# No weight decay on Swin's position parameters (norms already have none: weight_decay_norm=0).
optimizer.params.overrides = {
    "absolute_pos_embed": {"weight_decay": 0.0},
    "relative_position_bias_table": {"weight_decay": 0.0},
}

train.init_checkpoint = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_tiny_patch4_window7_224.pth?matching_heuristics=True"
)
train.output_dir = "./output/focus_detr_swin_tiny_4scale_12ep"
