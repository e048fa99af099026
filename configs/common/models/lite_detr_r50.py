# Lite DETR's encoder (CVPR 2023) on the Focus-DETR R50 model: H3L1-(2+1)x3, i.e. the three
# coarse levels (strides 16/32/64) are updated in 2 high-level layers per block, then every
# token in one all-level layer (stride-8 tokens with a 256-wide FFN), 3 blocks = 9 layers.
# key_aware=True selects key-aware deformable attention. Everything else is shared with
# common/models/focus_detr_r50.py.
from detectron2.config import LazyCall as L

from focus_detr.modeling import LiteEncoder

from .focus_detr_r50 import model

model.encoder = L(LiteEncoder)(
    embed_dim="${..hidden_dim}",
    num_heads=8,
    num_levels="${..decoder.num_levels}",
    num_points=4,
    ffn_dim=2048,
    low_ffn_dim=256,
    dropout=0.0,
    num_high_levels=3,
    high_updates_per_block=2,
    num_blocks=3,
    key_aware=False,
)
