# The demo (focus_detr_demo_shapes.py) with RT-DETR's hybrid encoder: same data, schedule,
# backbone, decoder and sizes (128 channels, 4 heads, FFN 256) on the three backbone levels, as
# RT-DETR: AIFI (one layer) on the stride-32 map, CCFF with 3 RepVGG blocks per CSP layer at
# expansion 0.5 (RT-DETR's setting for its smallest backbone, ResNet-18; the demo's is narrower
# still); the neck is RT-DETR's input projection (1x1 conv + batch norm, no extra level) and the
# decoder samples 3 levels. Plain batch norm: one process's batches of 8 images.
from detectron2.config import LazyCall as L

from focus_detr.modeling import HybridEncoder

from .focus_detr_demo_shapes import dataloader, lr_multiplier, model, optimizer, train

model.neck.num_extra_levels = 0
model.neck.norm = "BN"
model.neck.pop("num_groups")
model.decoder.num_levels = 3
model.encoder = L(HybridEncoder)(
    embed_dim="${..hidden_dim}",
    num_levels="${..decoder.num_levels}",
    num_aifi_layers=1,
    num_heads=4,
    ffn_dim=256,
    num_blocks=3,
    expansion=0.5,
    norm="BN",
    # Departures from RT-DETR (docs/differences_from_reference.md), as the Focus demo takes its
    # own: the demo's batches mix aspect ratios, so the maps are rarely square and padded.
    # "row_major" gives every cell its own row and column in the sin-cos embedding (RT-DETR's
    # layout is right on square maps only); "masked" keeps padded cells out of AIFI's keys and
    # the fusion's 3x3 convolutions, so an image's detections do not depend on its batch.
    position_layout="row_major",
    padding="masked",
)
train.output_dir = "./output/rtdetr_hybrid_demo_shapes"
