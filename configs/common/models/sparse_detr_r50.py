# Sparse DETR's encoder (ICLR 2022) on the Focus-DETR R50 model: a scoring network keeps the best
# 10% of the tokens (keep_ratio, Sparse DETR's rho), every layer updates them against the full
# current memory, auxiliary detection heads after every layer but the last. Everything else is
# shared with common/models/focus_detr_r50.py.
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
)
