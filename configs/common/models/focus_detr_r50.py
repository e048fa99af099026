# Focus-DETR with a ResNet-50 backbone, 4 scales (res3-res5 + one stride-2 level): the reference
# hyperparameters (hidden 256, 8 heads, 6 + 6 layers, FFN 2048, 4 points, 900 queries, keep ratio
# 0.5 with factors (1.0, 0.8, 0.6, 0.6, 0.4, 0.2), top-300 dual attention, 100 denoising queries)
# and the reference behaviour (docs/differences_from_reference.md lists the options that depart
# from it; they are all off here).
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from focus_detr.modeling import (
    REFERENCE_SIZE_RANGES,
    ContrastiveDenoising,
    DINODecoder,
    FocusEncoder,
    HungarianMatcher,
    MultiScaleNeck,
    SetCriterion,
    TwoStageDETR,
    TwoStageQuerySelection,
    neck_from_backbone,
)

model = L(TwoStageDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=1,
    ),
    # built from the backbone's output_shape(): 1x1 projections of res3-res5, one stride-2 level
    neck=L(neck_from_backbone)(
        neck_class=MultiScaleNeck,
        in_features=["res3", "res4", "res5"],
        out_channels="${..hidden_dim}",
        num_extra_levels=1,
        num_groups=32,
    ),
    hidden_dim=256,
    num_classes=80,
    encoder=L(FocusEncoder)(
        embed_dim="${..hidden_dim}",
        num_layers=6,
        num_heads=8,
        num_levels="${..decoder.num_levels}",  # the level count is the decoder's
        num_points=4,
        ffn_dim=2048,
        dropout=0.0,
        keep_ratio=0.5,
        layer_keep_factors=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
        topk_sa=300,
        score_product="logit",
        project_category_input=False,
        selector_input_mask="proposals",
        value_source="initial",
        padded_batches="reference",
        foreground_ranges=REFERENCE_SIZE_RANGES,
        foreground_loss_weight=1.5,
    ),
    decoder=L(DINODecoder)(
        num_layers=6,
        embed_dim="${..hidden_dim}",
        num_heads=8,
        feedforward_dim=2048,
        dropout=0.0,
        num_levels=4,  # transformer levels: len(in_features) + num_extra_levels
        num_points=4,
        num_classes="${..num_classes}",
        refine_from_normed=False,
        inverse_sigmoid_eps=1e-3,
    ),
    query_selection=L(TwoStageQuerySelection)(
        hidden_dim="${..hidden_dim}",
        num_classes="${..num_classes}",
        num_queries=900,
        select_invalid_tokens=True,
        select_padded_tokens=True,
    ),
    denoising=L(ContrastiveDenoising)(
        num_classes="${..num_classes}",
        hidden_dim="${..hidden_dim}",
        dn_number=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_select=300,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    transformer_init="xavier",
    # a departure kept (docs/differences_from_reference.md): detrex builds no padding mask at
    # inference, which shrinks the boxes of an image smaller than its batch; the same result on
    # a batch of one image (detectron2's test loader). False reproduces detrex's inference.
    inference_padding_masks=True,
)
