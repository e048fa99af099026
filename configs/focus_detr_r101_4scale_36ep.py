# Focus-DETR R101 4-scale, 36 epochs on COCO 2017 (reference: 51.4 box AP).
from .focus_detr_r50_4scale_36ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "./output/focus_detr_r101_4scale_36ep"
