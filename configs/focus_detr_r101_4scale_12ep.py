# Focus-DETR R101 4-scale, 12 epochs on COCO 2017 (reference: 50.8 box AP): the R50 recipe with
# the R101 model.
from .common.models.focus_detr_r101 import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "./output/focus_detr_r101_4scale_12ep"
