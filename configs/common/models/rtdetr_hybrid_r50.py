# RT-DETR's hybrid encoder (CVPR 2024) on the Focus-DETR R50 model, at RT-DETR's R50 settings.
# RT-DETR runs on the three backbone levels (strides 8, 16, 32): its input projection is the neck
# (a 1x1 conv without bias + batch norm per level, no extra level), its encoder is AIFI (one
# transformer layer, 8 heads, FFN 1024, GELU, 2-D sin-cos positions at temperature 10000) on the
# stride-32 map and the CCFF fusion (CSP layers of 3 RepVGG blocks, expansion 1.0, SiLU), and the
# decoder samples the same three levels. RT-DETR trains with synchronized batch norm ("SyncBN":
# plain batch norm in a single process). Behaviour as in RT-DETR: the position layout of its
# embedding ("column_major") and padding seen by attention and convolutions ("visible"); see
# docs/differences_from_reference.md. The encoder ignores the sine position and level
# embeddings of the other encoders (the model builds neither) and keeps PyTorch's
# initialisation under transformer_init="xavier". Everything else (backbone, decoder, query
# selection, denoising, losses) is shared with common/models/focus_detr_r50.py.
from detectron2.config import LazyCall as L

from focus_detr.modeling import HybridEncoder

from .focus_detr_r50 import model

model.neck.num_extra_levels = 0
model.neck.norm = "SyncBN"
model.neck.pop("num_groups")
model.decoder.num_levels = 3
model.encoder = L(HybridEncoder)(
    embed_dim="${..hidden_dim}",
    num_levels="${..decoder.num_levels}",
    aifi_levels=(-1,),
    num_aifi_layers=1,
    num_heads=8,
    ffn_dim=1024,
    dropout=0.0,
    aifi_activation="gelu",
    pe_temperature=10000.0,
    num_blocks=3,
    expansion=1.0,
    norm="SyncBN",
    activation="silu",
    position_layout="column_major",
    padding="visible",
)
