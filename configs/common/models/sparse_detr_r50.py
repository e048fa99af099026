# Sparse DETR's encoder (ICLR 2022) on the Focus-DETR R50 model: a scoring network keeps the best
# 10% of the tokens (keep_ratio, Sparse DETR's rho), every layer updates them against the full
# current memory, auxiliary detection heads after every layer but the last. The behaviour is
# Sparse DETR's code (kakaobrain/sparse-detr): the decoder-attention target splatted at
# loc * size, padding in the scoring network's context, the ranking and the saliency loss, and
# auxiliary heads on every gathered token. Its FFN 1024, dropout 0.1 and auxiliary loss weights
# (class 2 / L1 5 / GIoU 2) are those of Deformable DETR, its base detector; here the encoder
# uses the bench's DINO values (FFN 2048, dropout 0) and the shared criterion's weights (1 / 5 /
# 2), like every other encoder (docs/differences_from_reference.md). Everything else is shared
# with common/models/focus_detr_r50.py.
from detectron2.config import LazyCall as L

from focus_detr.modeling import SparseEncoder

from .focus_detr_r50 import model

model.encoder = L(SparseEncoder)(
    embed_dim="${..hidden_dim}",
    num_layers=6,
    num_heads=8,
    num_levels="${..decoder.num_levels}",
    num_points=4,
    ffn_dim=2048,
    dropout=0.0,
    keep_ratio=0.1,
    num_classes="${..num_classes}",
    aux_heads=True,
    saliency_loss_weight=1.0,
    attention_map_alignment="reference",
    padded_batches="reference",
    aux_tokens="gathered",
)
