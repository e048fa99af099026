# Lite DETR's encoder (H3L1-(2+1)x3) with the decoder, schedule and data of
# focus_detr_r50_4scale_12ep.py: only the encoder differs. Key-aware attention:
# model.encoder.key_aware=True.
from .common.models.lite_detr_r50 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/lite_detr_r50_4scale_12ep"
