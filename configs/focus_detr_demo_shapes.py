# The README's main job: Focus-DETR trained from scratch on the built-in synthetic shapes dataset
# on a CPU. The full Focus encoder (foreground token selector, cascade sparsification, dual
# attention) and DINO decoder (two-stage queries, contrastive denoising), with a narrow
# ResNet-10-style backbone (one basic block per stage), 128 channels, 4 heads, 3 + 3 layers,
# 100 queries, 1000 steps of 8 images of long side 192, in bfloat16 autocast where the CPU runs
# bfloat16 natively.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

from .common.data.shapes_demo import dataloader
from .common.models.focus_detr_r50 import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_lr_multiplier
from .common.train import train

_WIDTHS = (32, 64, 128, 256)


def _stage(index: int):
    return L(ResNet.make_stage)(
        block_class=BasicBlock,
        num_blocks=1,
        in_channels=_WIDTHS[max(index - 1, 0)],
        out_channels=_WIDTHS[index],
        stride_per_block=[1 if index == 0 else 2],
        norm="BN",
    )


model.backbone = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=_WIDTHS[0], norm="BN"),
    stages=[_stage(i) for i in range(4)],
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.num_classes = 6
model.hidden_dim = 128
model.encoder.num_layers = 3
model.encoder.num_heads = 4
model.encoder.layer_keep_factors = (1.0, 0.8, 0.6)
model.encoder.ffn_dim = 256
model.encoder.topk_sa = 64
model.decoder.num_layers = 3
model.decoder.num_heads = 4
model.decoder.feedforward_dim = 256
model.query_selection.num_queries = 100
model.denoising.dn_number = 50
model.num_select = 100
# The dataset's object sizes span the reference ranges (64 / 128 / 256 pixels) at a long side of
# 320; the demo trains at 192, so the foreground ranges scale by 0.6 to keep four size classes.
model.encoder.foreground_ranges = [(-1, 38.4), (38.4, 76.8), (76.8, 153.6), (153.6, float("inf"))]
# Departures from the reference behaviour (docs/differences_from_reference.md)
model.encoder.score_product = "probability"
model.encoder.project_category_input = True
model.encoder.selector_input_mask = "padding"
model.decoder.refine_from_normed = True
model.query_selection.select_invalid_tokens = False
model.query_selection.select_padded_tokens = False
# The demo trains on batches of mixed aspect ratios, so most images are padded: with
# "per_image" an image's encoding and loss do not depend on its batch-mates or its padding
# (the reference lets a small image keep its whole budget next to a large one, averages the
# padding into the selector's context and trains the selector on padded tokens).
model.encoder.padded_batches = "per_image"
model.transformer_init = "module"

train.device = "cpu"
# oneDNN convolutions and pooling are faster on channels-last tensors (same results)
model.channels_last = True
# plain BatchNorm (trained from scratch): with several processes, rank 0 broadcasts its statistics
train.ddp.broadcast_buffers = True
train.seed = 0
train.init_checkpoint = ""
train.output_dir = "./output/demo_shapes"
# bfloat16 autocast where the CPU runs it natively, else float32 (focus_detr.engine.precision)
train.amp.enabled = "auto"
train.max_iter = 1000
train.eval_period = 1000
train.log_period = 20
train.checkpointer.period = 1000

optimizer.lr = 4e-4
optimizer.params.lr_factor_func.keywords["factor"] = 1.0  # backbone trained from scratch
# The LR scheduler hook reads the schedule at iter / max_iter: the decay stays at 90% of training
# and the warm-up at 5% whatever train.max_iter is.
lr_multiplier = step_lr_multiplier(10, 9, iters_per_epoch=100)
lr_multiplier.warmup_length = 0.05
