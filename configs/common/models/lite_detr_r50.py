# Lite DETR's encoder (CVPR 2023) on the Focus-DETR R50 model, as its released code builds it:
# H3L1-(2+1)x3, i.e. the three coarse levels (strides 16/32/64) are high-level, the stride-8 level
# low-level; each of the 3 blocks is one high-level layer and one all-level layer (stride-8 tokens
# with a 256-wide FFN, the width of the tokens): 6 layers. (6+1)x1 is high_updates_per_block=6,
# num_blocks=1. key_aware=True selects key-aware deformable attention (the paper's model; the
# official code then makes the decoder's cross-attention key-aware too, see
# lite_detr_r50_keyaware_4scale_12ep.py). Everything else is shared with
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
    low_ffn_dim="${..hidden_dim}",
    dropout=0.0,
    num_high_levels=3,
    high_updates_per_block=2,
    num_blocks=3,
    key_aware=False,
)
