# Focus-DETR RegNetY-4.0GF 4-scale, 12 epochs on COCO 2017 (not measured here). The R50 recipe
# with the pycls DDS ImageNet weights (BGR input) of detectron2's RegNet configs.
from .common.models.focus_detr_regnety_4gf import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

# The pycls weights were trained on BGR images; the model config normalizes BGR.
dataloader.train.mapper.image_format = "BGR"
dataloader.test.mapper.image_format = "BGR"

train.init_checkpoint = (
    "https://dl.fbaipublicfiles.com/pycls/dds_baselines/160906838/RegNetY-4.0GF_dds_8gpu.pyth"
)
train.output_dir = "./output/focus_detr_regnety_4gf_4scale_12ep"
