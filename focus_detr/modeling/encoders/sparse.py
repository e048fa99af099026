"""The Sparse DETR encoder: a learned scoring network keeps a fixed share of the tokens."""

from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import clone_modules, detection_heads
from ..multi_scale import encoder_reference_points
from ..structures import EncoderOutput, FlattenedFeatures
from .attention_map import decoder_attention_map, top_tokens_target
from .base import DETREncoder, EncoderLossInputs
from .deformable_layer import DeformableEncoderLayer
from .foreground_selector import ForegroundTokenSelector
from .token_selection import (
    check_keep_ratio,
    compute_token_budgets,
    fill_padding_with_minimum,
)

__all__ = ["SparseEncoder"]


class SparseEncoder(DETREncoder):
    """
    Sparse DETR ("Sparse DETR: Efficient End-to-End Object Detection with Learnable Sparsity",
    ICLR 2022). A scoring network (the selector network of Focus-DETR without top-down
    modulation, with one global context per image) ranks the tokens once; every image keeps
    its best ``floor(keep_ratio * valid) + 1`` tokens, and every layer updates that same set with
    deformable attention on the current memory of all tokens. The scoring network learns from
    the decoder's cross-attention map: its target marks the same number of tokens the decoder
    attended to most (binary cross-entropy, ``loss_saliency``). Auxiliary detection heads on the
    kept tokens after every layer but the last are Hungarian-matched like the decoder
    (``loss_class_enc_aux_{l}``, ...).

    Shared heads: ``memory_projection`` (projects the scoring network's input, as the
    two-stage selection projects the memory). The keep ratio may be changed after training.
    """

    shared_heads = ("memory_projection",)
    needs_decoder_sampling = True

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        keep_ratio: float = 0.1,
        num_classes: int = 80,
        aux_heads: bool = True,
        saliency_loss_weight: float = 1.0,
        attention_map_alignment: str = "sampling",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout: see
                :class:`DeformableEncoderLayer`.
            num_layers: encoder layers (6).
            keep_ratio: rho in (0, 1], the share of an image's valid tokens every layer updates
                (Sparse DETR: 0.1 to 0.5).
            num_classes: K, outputs of the auxiliary class heads.
            aux_heads: add the auxiliary detection heads and their losses.
            saliency_loss_weight: weight of the scoring network's loss (1).
            attention_map_alignment: how decoder sampling points are splatted onto the tokens,
                see :func:`decoder_attention_map`.
            prior_prob: initial foreground probability of the auxiliary class heads.
        """
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if saliency_loss_weight < 0:
            raise ValueError(f"saliency_loss_weight must be >= 0, got {saliency_loss_weight}")
        if attention_map_alignment not in ("sampling", "reference"):
            raise ValueError(
                "attention_map_alignment must be 'sampling' or 'reference', got "
                f"{attention_map_alignment!r}"
            )
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.keep_ratio = keep_ratio
        self.saliency_loss_weight = saliency_loss_weight
        self.attention_map_alignment = attention_map_alignment
        self.prior_prob = prior_prob
        self.scorer = ForegroundTokenSelector(
            embed_dim=embed_dim, num_levels=num_levels, top_down=False, global_context="image"
        )
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.aux_class_heads: Optional[nn.ModuleList] = None
        self.aux_box_heads: Optional[nn.ModuleList] = None
        if aux_heads and num_layers > 1:
            class_head, box_head = detection_heads(embed_dim, num_classes, prior_prob)
            self.aux_class_heads = clone_modules(class_head, num_layers - 1)
            self.aux_box_heads = clone_modules(box_head, num_layers - 1)

    @property
    def keep_ratio(self) -> float:
        """rho: the share of an image's valid tokens every layer updates."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = check_keep_ratio(value)

    def reset_head_parameters(self) -> None:
        """Focal-loss prior of the auxiliary class heads, zero last box layers."""
        if self.aux_class_heads is None:
            return
        class_head, box_head = detection_heads(
            self.embed_dim, self.aux_class_heads[0].out_features, self.prior_prob
        )
        for head in self.aux_class_heads:
            head.load_state_dict(class_head.state_dict())
        for head in self.aux_box_heads:
            head.load_state_dict(box_head.state_dict())

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened tokens and geometry.
            shared_heads: ``memory_projection``.

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C), ``token_scores`` (B, N) saliency
            logits, the same (B, k) ``layer_indices`` / ``layer_valid`` for every layer, and
            ``extras["aux_outputs"]`` (training: per layer but the last, "pred_logits" (B, k, K),
            "pred_boxes" (B, k, 4), "valid" (B, k)) and ``extras["counts"]`` (B,) kept tokens.
        """
        self.check_features(features)
        tokens, padding_mask = features.tokens, features.padding_mask
        batch, num_tokens, channels = tokens.shape
        scorer_input = shared_heads["memory_projection"](
            (tokens + features.pos).masked_fill(~features.proposal_valid.unsqueeze(-1), 0.0)
        )
        logits = self.scorer(scorer_input, padding_mask, features.level_shapes)
        token_scores = fill_padding_with_minimum(logits, padding_mask)

        sizes, budgets = compute_token_budgets(
            (~padding_mask).sum(dim=1),
            self.keep_ratio,
            (1.0,) * self.num_layers,
            max_valid=num_tokens,
        )
        ranking = logits.detach().masked_fill(padding_mask, float("-inf"))
        indices = ranking.topk(min(sizes[0], num_tokens), dim=1).indices
        counts = budgets[0]
        valid = torch.arange(indices.shape[1], device=tokens.device)[None, :] < counts[:, None]
        valid &= ~padding_mask.gather(1, indices)
        token_index = indices.unsqueeze(-1).expand(-1, -1, channels)
        reference = encoder_reference_points(features).flatten(2)
        query_reference = reference.gather(
            1, indices.unsqueeze(-1).expand(-1, -1, reference.shape[-1])
        ).view(batch, indices.shape[1], self.num_levels, 2)
        query_pos = features.pos.gather(1, token_index)
        proposals = features.proposals.gather(1, indices.unsqueeze(-1).expand(-1, -1, 4))
        aux_valid = valid & features.proposal_valid.gather(1, indices)
        proposals = proposals.masked_fill(~aux_valid.unsqueeze(-1), 0.0)

        memory = tokens
        aux_outputs: List[Dict[str, torch.Tensor]] = []
        for layer_index, layer in enumerate(self.layers):
            query = memory.gather(1, token_index)
            updated = layer(
                query,
                query_pos,
                query_reference,
                memory,
                padding_mask,
                features.spatial_shapes,
                features.level_start_index,
            )
            updated = torch.where(valid.unsqueeze(-1), updated, query)
            memory = memory.scatter(1, token_index, updated)
            if self.training and self.aux_class_heads is not None:
                if layer_index < self.num_layers - 1:
                    aux_outputs.append(
                        {
                            "pred_logits": self.aux_class_heads[layer_index](updated),
                            "pred_boxes": (
                                self.aux_box_heads[layer_index](updated) + proposals
                            ).sigmoid(),
                            "valid": aux_valid,
                        }
                    )
        return EncoderOutput(
            memory=memory,
            layer_indices=[indices] * self.num_layers,
            layer_valid=[valid] * self.num_layers,
            token_scores=token_scores,
            extras={"aux_outputs": aux_outputs, "counts": counts},
        )

    def saliency_target(self, output: EncoderOutput, inputs: EncoderLossInputs) -> torch.Tensor:
        """(B, N) binary target: each image's ``counts`` tokens the decoder attended to most."""
        decoder = inputs.decoder
        if decoder is None or decoder.sampling_locations is None:
            raise ValueError(
                "SparseEncoder's loss needs the decoder's sampling locations and attention "
                "weights (needs_decoder_sampling): got none"
            )
        attention = decoder_attention_map(
            decoder.sampling_locations,
            decoder.attention_weights,
            inputs.features.level_shapes,
            alignment=self.attention_map_alignment,
        )
        return top_tokens_target(attention, inputs.features.padding_mask, output.extras["counts"])

    def losses(self, output: EncoderOutput, inputs: EncoderLossInputs) -> Dict[str, torch.Tensor]:
        """
        ``loss_saliency``: binary cross-entropy of the scoring network's logits against the
        decoder-attention target, averaged over each image's valid tokens, then over images;
        plus the matched losses of the auxiliary heads.
        """
        target = self.saliency_target(output, inputs)
        valid = ~inputs.features.padding_mask
        per_token = F.binary_cross_entropy_with_logits(
            output.token_scores, target, reduction="none"
        )
        per_image = (per_token * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        losses = {"loss_saliency": self.saliency_loss_weight * per_image.mean()}
        num_boxes = inputs.criterion.num_boxes(inputs.targets, target.device)
        for layer, aux in enumerate(output.extras.get("aux_outputs", [])):
            losses.update(
                inputs.criterion.matched_losses(
                    aux["pred_logits"],
                    aux["pred_boxes"],
                    inputs.targets,
                    suffix=f"_enc_aux_{layer}",
                    num_boxes=num_boxes,
                    valid_mask=aux["valid"],
                )
            )
        return losses

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, saliency_loss_weight={self.saliency_loss_weight}, "
            f"attention_map_alignment={self.attention_map_alignment!r}"
        )
