# Focus-DETR R50 4-scale, 12 epochs on COCO 2017 (reference: 48.8 box AP).
from .common.data.coco_detr import dataloader
from .common.models.focus_detr_r50 import model
from .common.optim import AdamW as optimizer
from .common.schedule import ITERS_PER_EPOCH
from .common.schedule import lr_multiplier_12ep as lr_multiplier
from .common.train import train

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/focus_detr_r50_4scale_12ep"
train.max_iter = 12 * ITERS_PER_EPOCH
train.eval_period = 5000
train.checkpointer.period = 5000
