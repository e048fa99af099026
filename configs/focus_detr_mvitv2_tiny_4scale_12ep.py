# Focus-DETR MViTv2-T 4-scale, 12 epochs on COCO 2017 (not measured here). The R50 recipe with
# detectron2's ImageNet-1k MViTv2-T weights (a pycls-style .pyth file, loaded with detectron2's
# matching heuristics) and, as detectron2's MViTv2 configs, no weight decay on the position
# embeddings and relative positions.
from .common.models.focus_detr_mvitv2_tiny import model
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

optimizer.params.overrides = {
    "pos_embed": {"weight_decay": 0.0},
    "rel_pos_h": {"weight_decay": 0.0},
    "rel_pos_w": {"weight_decay": 0.0},
}

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth"
train.output_dir = "./output/focus_detr_mvitv2_tiny_4scale_12ep"
