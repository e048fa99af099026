# RT-DETR's hybrid encoder with the decoder, schedule and data of focus_detr_r50_4scale_12ep.py.
# 3 scales, not 4, because the design has three: RT-DETR's fusion (CCFF) and its decoder work on
# the backbone's stride-8, -16 and -32 maps, projected by a 1x1 conv + batch norm each (the neck,
# without the extra stride-64 level of the 4-scale models). So the model differs from the others
# in the encoder, the neck (batch norm, no extra level) and the decoder's level count (3); data,
# schedule, optimizer, backbone and everything else of the decoder are the same.
from .common.models.rtdetr_hybrid_r50 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/rtdetr_hybrid_r50_3scale_12ep"
