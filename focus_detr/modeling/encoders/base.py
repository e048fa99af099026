"""The interface every encoder of the package implements."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..structures import DecoderOutput, EncoderOutput, FlattenedFeatures

if TYPE_CHECKING:  # pragma: no cover
    from ..criterion import SetCriterion

__all__ = ["DETREncoder", "EncoderLossInputs"]


@dataclass
class EncoderLossInputs:
    """
    What an encoder may use to compute its own losses (training only).

    Attributes:
        features: the flattened features the encoder received.
        targets: per image ``labels`` (M,) int64, ``boxes`` (M, 4) cxcywh normalized by the
            image size, ``boxes_xyxy`` (M, 4) absolute xyxy in the resized input image.
        criterion: the detector's set criterion; ``criterion.matched_losses`` Hungarian-matches
            and weighs an extra output set (e.g. encoder auxiliary heads).
        decoder: the decoder's output for the matching queries (denoising queries removed),
            with ``sampling_locations`` and ``attention_weights`` when the encoder's
            ``needs_decoder_sampling`` is True; None otherwise.
    """

    features: FlattenedFeatures
    targets: List[Dict[str, torch.Tensor]]
    criterion: "SetCriterion"
    decoder: Optional[DecoderOutput] = None


class DETREncoder(nn.Module):
    """
    Base class of the encoders (dense DINO, Focus, Sparse DETR, Lite DETR, RT-DETR's hybrid
    encoder). An encoder:

    - receives the :class:`FlattenedFeatures` and the shared heads it declares in
      ``shared_heads`` (names of modules owned by the two-stage query selection:
      ``"memory_projection"``, ``"class_head"``, ``"box_head"``). They are passed at every call,
      not stored, so their parameters exist once in the model;
    - returns an :class:`EncoderOutput`: the memory and, per layer, which tokens it updated;
    - computes its own auxiliary losses in :meth:`losses`, which the meta-architecture adds to
      the detector's losses without knowing their names. An encoder whose loss needs the
      decoder's cross-attention sets ``needs_decoder_sampling``.

    What the meta-architecture and the tools rely on is declared here: ``embed_dim`` (C, the
    token width), ``num_levels`` (L), ``num_layers``, and on the class:

    - ``has_keep_ratio``: True for encoders with a ``keep_ratio`` (the share of tokens they
      update) that may be changed after training, e.g. ``model.encoder.keep_ratio = 0.3``;
    - ``uses_position_embedding``: False for encoders that ignore ``features.pos`` (the sine
      embedding plus the learned level embedding). Nothing else reads it, so the
      meta-architecture then builds neither and passes ``pos=None``;
    - ``keeps_own_init``: True for encoders whose modules keep their own initialisation under
      the reference Xavier initialisation of the transformer (``transformer_init="xavier"``).
    """

    shared_heads: ClassVar[Tuple[str, ...]] = ()
    needs_decoder_sampling: ClassVar[bool] = False
    has_keep_ratio: ClassVar[bool] = False
    uses_position_embedding: ClassVar[bool] = True
    keeps_own_init: ClassVar[bool] = False

    def __init__(self, *, embed_dim: int, num_levels: int, num_layers: int):
        """
        Args:
            embed_dim: C, channels of the tokens in and out.
            num_levels: L, feature levels of the flattened features.
            num_layers: encoder layers (one ``EncoderOutput.layer_indices`` entry each).
        """
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_levels", num_levels),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_layers = num_layers

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened multi-scale tokens and their geometry.
            shared_heads: the modules named in ``shared_heads``.

        Returns:
            :class:`EncoderOutput`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def losses(self, output: EncoderOutput, inputs: EncoderLossInputs) -> Dict[str, torch.Tensor]:
        """Weighted scalar losses of the encoder's own heads; none by default."""
        return {}

    def check_features(self, features: FlattenedFeatures) -> None:
        """ValueError naming the shapes when ``features`` do not fit this encoder."""
        batch, num_tokens, channels = features.tokens.shape
        if features.pos is None:
            if self.uses_position_embedding:
                raise ValueError(
                    f"{type(self).__name__} uses the position embedding but the features have "
                    "pos=None"
                )
            pos_shape = features.tokens.shape
        else:
            pos_shape = features.pos.shape
        if channels != self.embed_dim or pos_shape != features.tokens.shape:
            raise ValueError(
                f"tokens {tuple(features.tokens.shape)} and pos {tuple(pos_shape)} "
                f"must both be (B, N, {self.embed_dim})"
            )
        if features.num_levels != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} has num_levels={self.num_levels}, the features have "
                f"{features.num_levels} levels {list(features.level_shapes)}"
            )
        if sum(features.level_sizes) != num_tokens:
            raise ValueError(
                f"level shapes {list(features.level_shapes)} do not add up to N={num_tokens}"
            )
        if features.padding_mask.shape != (batch, num_tokens):
            raise ValueError(
                f"padding_mask must be ({batch}, {num_tokens}), got "
                f"{tuple(features.padding_mask.shape)}"
            )
