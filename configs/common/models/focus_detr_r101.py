# Focus-DETR with a ResNet-101 backbone: the R50 model (res3-res5 + one stride-2 level, strides
# 8/16/32/64) with 101 layers.
from .focus_detr_r50 import model

model.backbone.stages.depth = 101
