"""A generic two-stage DETR meta-architecture: backbone -> neck -> encoder -> DINO decoder."""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.modeling import Backbone, detector_postprocess
from detectron2.structures import ImageList
from torch import nn

from .criterion import set_outputs
from .detection_targets import instances_to_targets, predictions_to_instances
from .encoders.base import DETREncoder, EncoderLossInputs
from .multi_scale import flatten_levels, level_padding_masks
from .neck import resolve_neck
from .position_encoding import PositionEmbeddingSine
from .structures import DecoderOutput, EncoderOutput, FlattenedFeatures
from .weight_init import TRANSFORMER_INITS, migrate_state_dict, reference_transformer_init

__all__ = ["TwoStageDETR", "FocusDETR", "InferenceDetails"]


@dataclass
class InferenceDetails:
    """
    What the network saw and did for a batch, returned by ``TwoStageDETR.inference(...,
    return_details=True)`` for tools and visualisation.

    Attributes:
        images: the normalized, padded input batch.
        features: the flattened multi-scale features (geometry, padding, proposals).
        encoder: the encoder's output (memory, tokens updated per layer, token scores).
        decoder: the decoder's predictions (matching queries), with the cross-attention's
            sampling locations and weights.
    """

    images: ImageList
    features: FlattenedFeatures
    encoder: EncoderOutput
    decoder: DecoderOutput


class TwoStageDETR(nn.Module):
    """
    A two-stage DETR as a detectron2 meta-architecture (DINO's recipe with any encoder). Any
    detectron2 ``Backbone`` feeds a neck (e.g. ``MultiScaleNeck``, built from the backbone's
    ``output_shape()``) or the encoder directly; the flattened multi-scale tokens go through an
    encoder (dense DINO, Focus, Sparse DETR, Lite DETR, RT-DETR's hybrid encoder: any
    :class:`DETREncoder`); two-stage query selection and contrastive denoising feed a DINO
    decoder. Training returns the weighted losses of the decoder, the two-stage selection, the
    denoising queries and whatever the encoder adds; inference returns
    ``[{"instances": Instances}]``.

    Focus-DETR is this class with a ``FocusEncoder`` (``FocusDETR`` is an alias).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        encoder: DETREncoder,
        decoder: nn.Module,
        query_selection: nn.Module,
        denoising: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        hidden_dim: int = 256,
        neck: Union[nn.Module, Callable[..., nn.Module], None] = None,
        position_embedding: Optional[nn.Module] = None,
        num_select: int = 300,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
        transformer_init: str = "xavier",
        channels_last: bool = False,
        inference_padding_masks: bool = True,
    ):
        """
        Args:
            backbone: any detectron2 backbone.
            encoder: a :class:`DETREncoder`; decoder: a ``DINODecoder``; query_selection: a
                ``TwoStageQuerySelection``; denoising: a ``ContrastiveDenoising``; criterion: a
                ``SetCriterion``.
            num_classes: object classes (no background class).
            hidden_dim: transformer channels.
            neck: maps the backbone's outputs to the transformer's levels (see
                :mod:`focus_detr.modeling.neck`): a module with ``strides`` and
                ``out_channels`` = ``hidden_dim``, or a builder called with
                ``input_shapes=backbone.output_shape()`` (:func:`neck_from_backbone`; it is
                built after the backbone, so a config need not know the backbone's channels),
                or None: every backbone output, finest first, goes straight to the encoder and
                must have ``hidden_dim`` channels.
            position_embedding: module mapping (B, H, W) masks to (B, hidden_dim, H, W);
                default sine embedding with hidden_dim / 2 features per axis. With an encoder
                that declares ``uses_position_embedding=False`` (nothing else reads the
                position embedding) the model has neither it nor the level embedding
                (``position_embedding`` and ``level_embed`` are None), and this must be None.
            num_select: detections kept per image at inference (at most the decoder queries).
            pixel_mean, pixel_std: normalization in ``input_format`` channel order.
            input_format: "RGB" or "BGR".
            transformer_init: "xavier" (reference): Xavier-uniform init of every weight matrix
                of the encoder (unless it declares ``keeps_own_init``), decoder layers and query
                selection, then each attention module's own init; "module": every module keeps
                its own initialisation.
            channels_last: run the backbone and the neck in the channels-last memory format
                (their weights and the input images), in which oneDNN's CPU convolutions and
                pooling run faster. The results are the same up to float rounding.
            inference_padding_masks: True: padding masks come from each image's size in
                training and in inference. False (detrex's inference): in eval mode the whole
                padded batch counts as every image (no padding mask), so the encoder, the
                query selection and the decoder treat padding as image, and boxes, predicted
                relative to the padded batch, are scaled by each image's own size: an image
                smaller than its batch gets boxes shrunk by its share of the batch. Both give
                the same result on a batch of one image (detectron2's test loader).
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_select <= 0:
            raise ValueError(f"num_select must be positive, got {num_select}")
        num_queries = getattr(query_selection, "num_queries", num_select)
        if num_select > num_queries:
            raise ValueError(
                f"num_select={num_select} detections per image need at least as many decoder "
                f"queries, got num_queries={num_queries}"
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"bad pixel_mean={pixel_mean} / pixel_std={pixel_std}")
        if transformer_init not in TRANSFORMER_INITS:
            raise ValueError(
                f"transformer_init must be one of {TRANSFORMER_INITS}, got {transformer_init!r}"
            )
        self.backbone = backbone
        self.neck, self._strides, self._in_features = resolve_neck(
            neck, backbone.output_shape(), hidden_dim
        )
        _check_parts(self._strides, hidden_dim, encoder, decoder)
        available = query_selection.shared_heads()
        missing = [name for name in encoder.shared_heads if name not in available]
        if missing:
            raise ValueError(
                f"{type(encoder).__name__} needs shared heads {missing}; the query selection "
                f"offers {sorted(available)}"
            )
        self.position_embedding: Optional[nn.Module] = None
        self.level_embed: Optional[nn.Parameter] = None
        if encoder.uses_position_embedding:
            self.position_embedding = position_embedding or PositionEmbeddingSine(
                num_pos_feats=hidden_dim // 2
            )
            self.level_embed = nn.Parameter(torch.empty(len(self._strides), hidden_dim))
        elif position_embedding is not None:
            raise ValueError(
                f"{type(encoder).__name__} does not use a position embedding "
                f"(uses_position_embedding=False); got position_embedding={position_embedding!r}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.query_selection = query_selection
        self.denoising = denoising
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_select = num_select
        self.input_format = input_format
        self.transformer_init = transformer_init
        self.channels_last = channels_last
        self.inference_padding_masks = inference_padding_masks
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if transformer_init == "xavier":
            reference_transformer_init(self)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            if self.neck is not None:
                self.neck.to(memory_format=torch.channels_last)
        self._register_load_state_dict_pre_hook(migrate_state_dict)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def strides(self) -> List[int]:
        """The nominal stride of every transformer level, finest first."""
        return list(self._strides)

    # --- input -----------------------------------------------------------------------------

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the images: (B, 3, H, W) with the backbone's padding constraints."""
        images = [self._normalize(x["image"].to(self.device)) for x in batched_inputs]
        padding_constraints = self.backbone.padding_constraints
        square_size = padding_constraints.get("square_size", 0)
        if square_size > 0 and any(max(image.shape[-2:]) > square_size for image in images):
            # ImageList would crop the image silently (negative padding)
            sizes = [tuple(image.shape[-2:]) for image in images]
            raise ValueError(f"images {sizes} do not fit the backbone's square_size={square_size}")
        images = ImageList.from_tensors(
            images, _size_divisibility(self.backbone), padding_constraints=padding_constraints
        )
        # Pad a batch of tiny images to two cells of the coarsest level per side: no feature map
        # is then one cell wide, where oneDNN's bfloat16 convolution returned NaN for some
        # weights (torch 2.14, CPU). Larger batches are unchanged, so is any image's result.
        min_size = 2 * max(self._strides)
        height, width = images.tensor.shape[-2:]
        if height < min_size or width < min_size:
            padding = (0, max(0, min_size - width), 0, max(0, min_size - height))
            images = ImageList(F.pad(images.tensor, padding), images.image_sizes)
        return images

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"expected a non-empty image, got shape {tuple(image.shape)}")
        return (image.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    # --- network ---------------------------------------------------------------------------

    def flatten_features(self, images: ImageList) -> FlattenedFeatures:
        """
        Backbone, neck, padding masks, position embeddings, flattening and proposals. The masks
        come from ``images.image_sizes``, except in eval mode without
        ``inference_padding_masks``, where every image is taken to fill the padded batch.
        """
        pixels = images.tensor
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        outputs = self.backbone(pixels)
        if self.neck is None:
            maps = [outputs[name] for name in self._in_features]
        else:
            maps = self.neck(outputs)
        padded_size = (images.tensor.shape[-2], images.tensor.shape[-1])
        level_shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        image_sizes = images.image_sizes
        if not (self.training or self.inference_padding_masks):
            image_sizes = [padded_size] * len(image_sizes)
        masks = level_padding_masks(image_sizes, padded_size, level_shapes, self.device)
        positions = None
        if self.position_embedding is not None:
            positions = [self.position_embedding(mask, maps[0].dtype) for mask in masks]
        return flatten_levels(
            maps,
            masks,
            positions,
            self.level_embed,
            strides=self._strides,
            padded_size=padded_size,
            image_sizes=image_sizes,
            proposal_base_scale=self.query_selection.base_scale,
        )

    def encode(self, features: FlattenedFeatures) -> EncoderOutput:
        """Run the encoder with the shared heads it declared."""
        available = self.query_selection.shared_heads()
        return self.encoder(features, {name: available[name] for name in self.encoder.shared_heads})

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
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.flatten_features(images)
        encoded = self.encode(features)
        selection = self.query_selection(encoded.memory, features)
        targets = instances_to_targets(
            [x["instances"] for x in batched_inputs],
            images.image_sizes,
            self.num_classes,
            device=self.device,
        )
        denoise = self.denoising(targets, num_queries=selection.queries.shape[1])
        queries, reference_boxes = selection.queries, selection.reference_boxes
        attn_mask = key_padding_mask = None
        if denoise is not None:
            queries = torch.cat([denoise.queries, queries], dim=1)
            reference_boxes = torch.cat([denoise.reference_boxes, reference_boxes], dim=1)
            attn_mask, key_padding_mask = denoise.attn_mask, denoise.key_padding_mask
        decoded = self.decoder(
            queries,
            reference_boxes,
            encoded.memory,
            features,
            self_attn_mask=attn_mask,
            self_attn_key_padding_mask=key_padding_mask,
            return_sampling=self.encoder.needs_decoder_sampling,
        )
        matching, dn_outputs = _split_denoising(decoded, denoise)
        outputs = set_outputs(
            matching.class_logits,
            matching.boxes,
            enc_logits=selection.enc_logits,
            enc_boxes=selection.enc_boxes,
            dn_outputs=dn_outputs,
        )
        losses = self.criterion(outputs, targets, denoise)
        encoder_losses = self.encoder.losses(
            encoded, EncoderLossInputs(features, targets, self.criterion, matching)
        )
        clashes = sorted(set(encoder_losses) & set(losses))
        if clashes:
            raise ValueError(f"the encoder's losses {clashes} clash with the detector's losses")
        losses.update(encoder_losses)
        if denoise is None and "loss_class_dn" in losses:
            # A batch without boxes builds no denoising queries: keep the label embedding in
            # the graph so DistributedDataParallel finds a gradient for every parameter.
            unused = sum(parameter.sum() for parameter in self.denoising.parameters())
            losses["loss_class_dn"] = losses["loss_class_dn"] + 0.0 * unused
        return losses

    def inference(
        self, batched_inputs: List[Dict], *, return_details: bool = False
    ) -> "List[Dict] | Tuple[List[Dict], InferenceDetails]":
        """
        Detections of a batch, without denoising queries or losses.

        Args:
            batched_inputs: as in :meth:`forward`.
            return_details: also return an :class:`InferenceDetails` (what the encoder kept,
                the decoder's sampling locations, the input geometry).

        Returns:
            ``[{"instances": Instances}]`` in original image coordinates, and the details when
            asked.
        """
        images = self.preprocess_image(batched_inputs)
        details = self.predict(images, return_sampling=return_details)
        results = self._postprocess(details.decoder, images, batched_inputs)
        if return_details:
            return results, details
        return results

    def predict(self, images: ImageList, *, return_sampling: bool = False) -> InferenceDetails:
        """
        The network on a preprocessed batch, without denoising queries (what :meth:`inference`
        decodes; export wrappers call it on their own padded input).

        Args:
            images: the normalized, padded batch (:meth:`preprocess_image`).
            return_sampling: also return the decoder's sampling locations and weights.

        Returns:
            :class:`InferenceDetails`; ``decoder.class_logits`` (D, B, Q, K) and
            ``decoder.boxes`` (D, B, Q, 4) cxcywh relative to each image's own size.
        """
        features = self.flatten_features(images)
        encoded = self.encode(features)
        selection = self.query_selection(encoded.memory, features)
        decoded = self.decoder(
            selection.queries,
            selection.reference_boxes,
            encoded.memory,
            features,
            return_sampling=return_sampling,
        )
        return InferenceDetails(images, features, encoded, decoded)

    def _postprocess(self, decoded, images: ImageList, batched_inputs) -> List[Dict]:
        results = predictions_to_instances(
            decoded.class_logits[-1], decoded.boxes[-1], images.image_sizes, self.num_select
        )
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


# Focus-DETR is a configuration of the generic two-stage DETR (kept for configs and checkpoints).
FocusDETR = TwoStageDETR


def _split_denoising(
    decoded: DecoderOutput, denoise
) -> Tuple[DecoderOutput, Optional[List[Dict[str, torch.Tensor]]]]:
    """The matching queries' part of the decoder output, and the denoising outputs per layer."""
    if denoise is None:
        return decoded, None
    (class_logits, boxes), dn_outputs = denoise.split_outputs(decoded.class_logits, decoded.boxes)
    pad = denoise.pad_size
    matching = DecoderOutput(
        class_logits=class_logits,
        boxes=boxes,
        sampling_locations=(
            None if decoded.sampling_locations is None else decoded.sampling_locations[:, :, pad:]
        ),
        attention_weights=(
            None if decoded.attention_weights is None else decoded.attention_weights[:, :, pad:]
        ),
    )
    return matching, dn_outputs


def _check_parts(
    strides: Sequence[int], hidden_dim: int, encoder: DETREncoder, decoder: nn.Module
) -> None:
    """ValueError naming the values when the levels, encoder and decoder disagree."""
    if not isinstance(encoder, DETREncoder):
        raise TypeError(f"encoder must be a DETREncoder, got {type(encoder).__name__}")
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        if module.num_levels != len(strides):
            raise ValueError(
                f"{name}.num_levels={module.num_levels} but the neck (or, without one, the "
                f"backbone) gives {len(strides)} levels of strides {list(strides)}"
            )
        if module.embed_dim != hidden_dim:
            raise ValueError(f"{name}.embed_dim={module.embed_dim} but hidden_dim={hidden_dim}")


def _size_divisibility(backbone: Backbone) -> int:
    try:
        return backbone.size_divisibility
    except AttributeError:
        # detectron2's SwinTransformer stores `_size_devisibility` (sic): its
        # `size_divisibility` property raises AttributeError
        return getattr(backbone, "_size_devisibility", 0)
