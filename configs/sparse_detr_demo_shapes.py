# The demo (focus_detr_demo_shapes.py) with Sparse DETR's encoder: same data, schedule,
# backbone, decoder and sizes (128 channels, 4 heads, 3 layers, FFN 256); keep ratio 0.3.
from detectron2.config import LazyCall as L

from focus_detr.modeling import SparseEncoder

from .focus_detr_demo_shapes import dataloader, lr_multiplier, model, optimizer, train

model.encoder = L(SparseEncoder)(
    embed_dim="${..hidden_dim}",
    num_layers=3,
    num_heads=4,
    num_levels="${..decoder.num_levels}",
    num_points=4,
    ffn_dim=256,
    keep_ratio=0.3,
    num_classes="${..num_classes}",
)
train.output_dir = "./output/sparse_detr_demo_shapes"
