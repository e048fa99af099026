# Focus-DETR R101 4-scale, 36 epochs on COCO 2017 (reference: 51.4 box AP): the 12-epoch
# config with the 36-epoch schedule.
from .common.schedule import ITERS_PER_EPOCH
from .common.schedule import lr_multiplier_36ep as lr_multiplier
from .focus_detr_r101_4scale_12ep import dataloader, model, optimizer, train

train.max_iter = 36 * ITERS_PER_EPOCH
train.output_dir = "./output/focus_detr_r101_4scale_36ep"
