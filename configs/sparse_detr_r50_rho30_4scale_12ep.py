# Sparse DETR with keep ratio 0.3 (the paper's rho = 30%); everything else as
# sparse_detr_r50_4scale_12ep.py (rho = 10%).
from .sparse_detr_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.encoder.keep_ratio = 0.3
train.output_dir = "./output/sparse_detr_r50_rho30_4scale_12ep"
