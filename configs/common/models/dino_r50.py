# DINO-R50 4-scale: the Focus-DETR R50 model with the dense deformable encoder (every layer
# updates all tokens). Everything else (backbone, neck, decoder, query selection, denoising,
# losses) is shared with common/models/focus_detr_r50.py.
from detectron2.config import LazyCall as L

from focus_detr.modeling import DenseEncoder

from .focus_detr_r50 import model

model.encoder = L(DenseEncoder)(
    embed_dim="${..hidden_dim}",
    num_layers=6,
    num_heads=8,
    num_levels="${..decoder.num_levels}",
    num_points=4,
    ffn_dim=2048,
    dropout=0.0,
)
