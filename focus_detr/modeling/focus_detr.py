"""The Focus-DETR meta-architecture: backbone -> neck -> Focus encoder -> DINO decoder."""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import Backbone, detector_postprocess
from detectron2.structures import ImageList
from torch import nn

from .detection_targets import instances_to_targets, predictions_to_instances
from .foreground_targets import ForegroundLoss
from .multi_scale import encoder_reference_points, flatten_levels, level_padding_masks
from .neck import MultiScaleNeck
from .position_encoding import PositionEmbeddingSine

__all__ = ["FocusDETR"]


class FocusDETR(nn.Module):
    """
    Focus-DETR (ICCV 2023) as a detectron2 meta-architecture. Any detectron2 ``Backbone`` feeds a
    neck built from its ``output_shape()``; the encoder (Focus, or any module with the same
    contract) refines the flattened tokens; two-stage query selection and contrastive denoising
    feed a DINO decoder. Training returns weighted losses, inference ``[{"instances": ...}]``.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        encoder: nn.Module,
        decoder: nn.Module,
        query_selection: nn.Module,
        denoising: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        hidden_dim: int = 256,
        num_extra_levels: int = 1,
        neck_num_groups: int = 32,
        position_embedding: Optional[nn.Module] = None,
        foreground_ranges: Optional[Sequence[Tuple[float, float]]] = None,
        foreground_loss_weight: float = 1.5,
        foreground_focal_alpha: float = 0.25,
        foreground_focal_gamma: float = 2.0,
        num_select: int = 300,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
    ):
        """
        Args:
            backbone: any detectron2 backbone; ``in_features`` name its outputs, finest first.
            encoder: a ``FocusEncoder`` (or an encoder with the same forward contract).
            decoder: a ``DINODecoder``; query_selection: a ``TwoStageQuerySelection``;
                denoising: a ``ContrastiveDenoising``; criterion: a ``SetCriterion``.
            num_classes: object classes (no background class).
            hidden_dim: transformer channels.
            num_extra_levels: stride-2 levels added after the last backbone level.
            neck_num_groups: GroupNorm groups of the neck.
            position_embedding: module mapping (B, H, W) masks to (B, hidden_dim, H, W);
                default sine embedding with hidden_dim / 2 features per axis.
            foreground_ranges: per level (lo, hi] of the box's max distance to a location for
                the foreground targets; default: the reference ranges (-1, 64], (64, 128], ...,
                extended by doubling for more than 4 levels, last one unbounded.
            foreground_loss_weight: weight of the foreground token selector loss.
            num_select: detections kept per image at inference.
            pixel_mean, pixel_std: normalization in ``input_format`` channel order.
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_select <= 0:
            raise ValueError(f"num_select must be positive, got {num_select}")
        if foreground_loss_weight < 0:
            raise ValueError(f"foreground_loss_weight must be >= 0, got {foreground_loss_weight}")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"bad pixel_mean={pixel_mean} / pixel_std={pixel_std}")
        self.backbone = backbone
        self.neck = MultiScaleNeck(
            input_shapes=backbone.output_shape(),
            in_features=in_features,
            out_channels=hidden_dim,
            num_extra_levels=num_extra_levels,
            num_groups=neck_num_groups,
        )
        num_levels = self.neck.num_levels
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            module_levels = getattr(module, "num_levels", num_levels)
            if module_levels != num_levels:
                raise ValueError(
                    f"{name}.num_levels={module_levels} but the backbone features "
                    f"{list(in_features)} plus num_extra_levels={num_extra_levels} give "
                    f"{num_levels} levels"
                )
        self.position_embedding = position_embedding or PositionEmbeddingSine(
            num_pos_feats=hidden_dim // 2
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = encoder
        self.decoder = decoder
        self.query_selection = query_selection
        self.denoising = denoising
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_select = num_select
        self.foreground_criterion = ForegroundLoss(
            strides=self.neck.strides,
            ranges=(
                _default_ranges(num_levels) if foreground_ranges is None else foreground_ranges
            ),
            alpha=foreground_focal_alpha,
            gamma=foreground_focal_gamma,
            weight=foreground_loss_weight,
        )
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def strides(self) -> List[int]:
        return self.neck.strides

    @property
    def foreground_ranges(self) -> List[Tuple[float, float]]:
        """The (lo, hi] object-size range of every level for the foreground targets."""
        return self.foreground_criterion.ranges

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the images: (B, 3, H, W) with the backbone's padding constraints."""
        images = [self._normalize(x["image"].to(self.device)) for x in batched_inputs]
        padding_constraints = self.backbone.padding_constraints
        square_size = padding_constraints.get("square_size", 0)
        if square_size > 0 and any(max(image.shape[-2:]) > square_size for image in images):
            # ImageList would crop the image silently (negative padding)
            sizes = [tuple(image.shape[-2:]) for image in images]
            raise ValueError(f"images {sizes} do not fit the backbone's square_size={square_size}")
        return ImageList.from_tensors(
            images, _size_divisibility(self.backbone), padding_constraints=padding_constraints
        )

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        return (image.float() - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dataset-mapper dicts: ``image`` (3, H, W) in
                ``input_format``, ``instances`` with ``gt_boxes``/``gt_classes`` (training),
                optional ``height``/``width`` of the original image (inference).

        Returns:
            training: dict of weighted scalar losses; inference: ``[{"instances": Instances}]``
            in the original image coordinates.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        maps = self.neck(features)
        masks = level_padding_masks(
            images.image_sizes,
            tuple(images.tensor.shape[-2:]),
            [m.shape[-2:] for m in maps],
            self.device,
        )
        positions = [self.position_embedding(mask).to(maps[0].dtype) for mask in masks]
        flat = flatten_levels(maps, masks, positions, self.level_embed)
        encoded = self.encoder(
            tokens=flat.tokens,
            token_pos=flat.token_pos,
            padding_mask=flat.padding_mask,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
            reference_points=encoder_reference_points(flat.spatial_shapes, flat.valid_ratios),
            token_projection=self.query_selection.memory_projection,
            category_head=self.query_selection.class_head,
        )
        selection = self.query_selection(encoded.memory, flat.padding_mask, flat.spatial_shapes)
        targets = None
        denoise = None
        if self.training:
            targets = instances_to_targets(
                [x["instances"].to(self.device) for x in batched_inputs], images.image_sizes
            )
            denoise = self.denoising(targets, num_queries=selection.queries.shape[1])
        queries, reference_boxes = selection.queries, selection.reference_boxes
        attn_mask = key_padding_mask = None
        if denoise is not None:
            queries = torch.cat([denoise.queries, queries], dim=1)
            reference_boxes = torch.cat([denoise.reference_boxes, reference_boxes], dim=1)
            attn_mask, key_padding_mask = denoise.attn_mask, denoise.key_padding_mask
        class_logits, boxes = self.decoder(
            queries=queries,
            reference_boxes=reference_boxes,
            memory=encoded.memory,
            memory_padding_mask=flat.padding_mask,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
            self_attn_mask=attn_mask,
            self_attn_key_padding_mask=key_padding_mask,
        )
        if self.training:
            losses = self.criterion(
                self._decoder_outputs(class_logits, boxes, selection, denoise), targets, denoise
            )
            losses["loss_foreground"] = self._foreground_loss(encoded, flat, targets)
            if denoise is None:
                # A batch without boxes builds no denoising queries: keep the label embedding in
                # the graph so DistributedDataParallel finds a gradient for every parameter.
                unused = sum(parameter.sum() for parameter in self.denoising.parameters())
                losses["loss_class_dn"] = losses["loss_class_dn"] + 0.0 * unused
            return losses
        return self._postprocess(class_logits[-1], boxes[-1], images, batched_inputs)

    def _decoder_outputs(self, class_logits, boxes, selection, denoise) -> Dict:
        """Split the denoising part off and arrange the outputs the criterion expects."""
        dn_outputs = None
        if denoise is not None:
            (class_logits, boxes), dn_outputs = denoise.split_outputs(class_logits, boxes)
        outputs = {
            "pred_logits": class_logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": logits, "pred_boxes": layer_boxes}
                for logits, layer_boxes in zip(class_logits[:-1], boxes[:-1])
            ],
            "enc_outputs": {"pred_logits": selection.enc_logits, "pred_boxes": selection.enc_boxes},
        }
        if dn_outputs is not None:
            outputs["dn_outputs"] = dn_outputs
        return outputs

    def _foreground_loss(self, encoded, flat, targets) -> torch.Tensor:
        if encoded.foreground_logits is None:
            return flat.tokens.sum() * 0.0
        return self.foreground_criterion(
            encoded.foreground_logits,
            flat.padding_mask,
            flat.spatial_shapes,
            [t["boxes_xyxy"] for t in targets],
        )

    def _postprocess(self, class_logits, boxes, images: ImageList, batched_inputs) -> List[Dict]:
        results = predictions_to_instances(class_logits, boxes, images.image_sizes, self.num_select)
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


def _size_divisibility(backbone: Backbone) -> int:
    try:
        return backbone.size_divisibility
    except AttributeError:
        # detectron2's SwinTransformer stores `_size_devisibility` (sic): its
        # `size_divisibility` property raises AttributeError
        return getattr(backbone, "_size_devisibility", 0)


def _default_ranges(num_levels: int) -> List[Tuple[float, float]]:
    # The reference's (-1, 64], (64, 128], (128, 256], (256, inf) for 4 levels: level l up to
    # 64 * 2^l, the last level unbounded.
    bounds = [-1.0] + [64.0 * 2**level for level in range(num_levels - 1)] + [math.inf]
    return list(zip(bounds[:-1], bounds[1:]))
