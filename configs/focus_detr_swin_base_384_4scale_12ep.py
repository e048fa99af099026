# Focus-DETR Swin-B (384, ImageNet-22k) 4-scale, 12 epochs on COCO 2017 (not measured here; the
# paper reports 56.2 box AP for 36 epochs).
from .common.models.focus_detr_swin_base_384 import model
from .focus_detr_swin_tiny_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.init_checkpoint = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_base_patch4_window12_384_22k.pth?matching_heuristics=True"
)
train.output_dir = "./output/focus_detr_swin_base_384_4scale_12ep"
