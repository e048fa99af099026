# The demo (focus_detr_demo_shapes.py) with Sparse DETR's encoder: same data, schedule,
# backbone, decoder and sizes (128 channels, 4 heads, 3 layers, FFN 256); keep ratio 0.3. It
# departs from Sparse DETR's code on padded batches (the demo's batches mix aspect ratios, so
# most images are padded): "per_image" scores and trains an image the same alone or in any
# batch, and the auxiliary heads score only the tokens an image writes; the decoder's attention
# is splatted where the deformable attention reads ("sampling").
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
    attention_map_alignment="sampling",
    padded_batches="per_image",
    aux_tokens="written",
)
train.output_dir = "./output/sparse_detr_demo_shapes"
