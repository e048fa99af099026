# DINO R50 4-scale, 12 epochs on COCO 2017 (DINO reports 49.2 box AP with its own code): the dense
# baseline of focus_detr_r50_4scale_12ep.py, identical but for the encoder.
from .common.models.dino_r50 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/dino_r50_4scale_12ep"
