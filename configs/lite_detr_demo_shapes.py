# The demo (focus_detr_demo_shapes.py) with Lite DETR's encoder: same data, schedule, backbone,
# decoder and sizes (128 channels, 4 heads, FFN 256); H3L1-(3+1)x1 = [high, high, all], 3 layers
# like the demo's other encoders. Key-aware attention as in Lite DETR's paper:
# model.encoder.key_aware=True and model.decoder.key_aware=True.
from detectron2.config import LazyCall as L

from focus_detr.modeling import LiteEncoder

from .focus_detr_demo_shapes import dataloader, lr_multiplier, model, optimizer, train

model.encoder = L(LiteEncoder)(
    embed_dim="${..hidden_dim}",
    num_heads=4,
    num_levels="${..decoder.num_levels}",
    num_points=4,
    ffn_dim=256,
    low_ffn_dim="${..hidden_dim}",
    num_high_levels=3,
    high_updates_per_block=3,
    num_blocks=1,
    key_aware=False,
)
train.output_dir = "./output/lite_detr_demo_shapes"
