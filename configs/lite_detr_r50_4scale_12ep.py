# Lite DETR's encoder (H3L1-(2+1)x3, 6 layers) with the decoder, schedule and data of
# focus_detr_r50_4scale_12ep.py: only the encoder differs. Plain deformable attention, the
# speed option of Lite DETR's code (key_aware=False); the paper's key-aware model is
# lite_detr_r50_keyaware_4scale_12ep.py.
from .common.models.lite_detr_r50 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/lite_detr_r50_4scale_12ep"
