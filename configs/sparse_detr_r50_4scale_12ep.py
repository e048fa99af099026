# Sparse DETR's encoder (keep ratio 0.1) with the decoder, schedule and data of
# focus_detr_r50_4scale_12ep.py: only the encoder differs.
from .common.models.sparse_detr_r50 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/sparse_detr_r50_4scale_12ep"
