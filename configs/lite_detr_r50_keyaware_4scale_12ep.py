# Lite DETR H3L1-(2+1)x3 as in its paper: key-aware deformable attention (keys sampled with the
# values from the same projection, weights from query-key products) in the encoder and, as Lite
# DETR's code does with key_aware=True, in the decoder's cross-attention; everything else as
# lite_detr_r50_4scale_12ep.py.
from .lite_detr_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.encoder.key_aware = True
model.decoder.key_aware = True
train.output_dir = "./output/lite_detr_r50_keyaware_4scale_12ep"
