# Focus-DETR Swin-S 4-scale, 12 epochs on COCO 2017 (not measured here), ImageNet-1k weights.
from .common.models.focus_detr_swin_small import model
from .focus_detr_swin_tiny_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.init_checkpoint = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_small_patch4_window7_224.pth?matching_heuristics=True"
)
train.output_dir = "./output/focus_detr_swin_small_4scale_12ep"
