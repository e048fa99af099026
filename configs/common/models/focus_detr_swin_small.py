# Focus-DETR with a Swin-S backbone (ImageNet-1k 224 weights): Swin-T with 18 blocks in stage 3;
# p1-p3 (192/384/768 channels) + one neck level, strides 8/16/32/64.
from .focus_detr_swin_tiny import model

model.backbone.depths = (2, 2, 18, 2)
model.backbone.drop_path_rate = 0.2
