# Focus-DETR R101 4-scale, 24 epochs on COCO 2017 (reference: 51.2 box AP): the 12-epoch
# config with the 24-epoch schedule.
from .common.schedule import ITERS_PER_EPOCH
from .common.schedule import lr_multiplier_24ep as lr_multiplier
from .focus_detr_r101_4scale_12ep import dataloader, model, optimizer, train

train.max_iter = 24 * ITERS_PER_EPOCH
train.output_dir = "./output/focus_detr_r101_4scale_24ep"
