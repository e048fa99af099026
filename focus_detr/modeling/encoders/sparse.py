"""The Sparse DETR encoder: a learned scoring network keeps a fixed share of the tokens."""

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import clone_modules, detection_heads
from ..structures import EncoderOutput, FlattenedFeatures
from .attention_map import decoder_attention_map, top_tokens_target
from .base import EncoderLossInputs
from .deformable_layer import DeformableEncoderLayer
from .foreground_selector import ForegroundTokenSelector
from .token_selection import fill_padding_with_minimum
from .token_sparse import SelectedTokens, TokenSparseEncoder

__all__ = ["SparseEncoder"]


_PADDED_BATCHES = ("reference", "per_image")
_AUX_TOKENS = ("gathered", "written")


class SparseEncoder(TokenSparseEncoder):
    """
    Sparse DETR ("Sparse DETR: Efficient End-to-End Object Detection with Learnable Sparsity",
    ICLR 2022). A scoring network (the selector network of Focus-DETR without top-down
    modulation, with one global context per image) ranks the tokens once; every image keeps
    its best ``floor(keep_ratio * valid) + 1`` tokens, and every layer updates that same set with
    deformable attention on the current memory of all tokens. The scoring network learns from
    the decoder's cross-attention map: its target marks the same number of tokens the decoder
    attended to most (binary cross-entropy, ``loss_saliency``). Auxiliary detection heads on the
    gathered tokens after every layer but the last are Hungarian-matched like the decoder
    (``loss_class_enc_aux_{l}``, ...).

    The defaults are Sparse DETR's code (kakaobrain/sparse-detr); the options that depart from
    it are listed in docs/differences_from_reference.md.

    Shared heads: ``memory_projection`` (projects the scoring network's input, as the
    two-stage selection projects the memory). The keep ratio may be changed after training.
    """

    shared_heads = ("memory_projection",)
    needs_decoder_sampling = True

    def __init__(
        self,
        *,
        keep_ratio: float = 0.1,
        num_classes: int = 80,
        aux_heads: bool = True,
        saliency_loss_weight: float = 1.0,
        attention_map_alignment: str = "reference",
        padded_batches: str = "reference",
        aux_tokens: str = "gathered",
        prior_prob: float = 0.01,
        **kwargs,
    ):
        """
        Args:
            keep_ratio: rho in (0, 1], the share of an image's valid tokens every layer updates
                (Sparse DETR: 0.1 to 0.5).
            num_classes: K, outputs of the auxiliary class heads.
            aux_heads: add the auxiliary detection heads and their losses.
            saliency_loss_weight: weight of the scoring network's loss (1).
            attention_map_alignment: how decoder sampling points are splatted onto the tokens,
                see :func:`decoder_attention_map`: "reference" (Sparse DETR's code,
                ``loc * size``) or "sampling" (``loc * size - 0.5``, where the values are read).
            padded_batches: how padding enters on a padded batch (both agree on one image):

                - "reference" (Sparse DETR's code): the scoring network's global mean runs over
                  every token, padding included; padded logits are set to the batch's smallest
                  raw logit (padded ones included, with gradient), and the tokens are ranked by
                  that filled tensor; the saliency loss averages over all tokens of the padded
                  batch, padded ones (target 0) included;
                - "per_image": an image is scored and trained the same alone or in any batch:
                  the global mean and the loss run over the image's valid tokens, padded tokens
                  rank last.
            aux_tokens: which of the gathered tokens the auxiliary heads score and match:
                "gathered" (Sparse DETR's code): all of them, beyond the image's budget (which
                keep their updates from layer to layer), gathered padding and tokens whose
                proposal is invalid (box (1, 1, 1, 1)) included; "written": only the tokens the
                image writes that have a valid proposal.
            prior_prob: initial foreground probability of the auxiliary class heads.
            kwargs: ``embed_dim``, ``num_layers`` (Sparse DETR: 6), ``num_heads``,
                ``num_levels``, ``num_points``, ``ffn_dim``, ``dropout``: see
                :class:`DeformableEncoder` (Sparse DETR's code: FFN 1024, dropout 0.1, those of
                Deformable DETR; the configs use the bench's DINO values).
        """
        super().__init__(keep_ratio=keep_ratio, **kwargs)
        embed_dim, num_layers = self.embed_dim, self.num_layers
        if saliency_loss_weight < 0:
            raise ValueError(f"saliency_loss_weight must be >= 0, got {saliency_loss_weight}")
        for name, value, allowed in (
            ("attention_map_alignment", attention_map_alignment, ("reference", "sampling")),
            ("padded_batches", padded_batches, _PADDED_BATCHES),
            ("aux_tokens", aux_tokens, _AUX_TOKENS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.saliency_loss_weight = saliency_loss_weight
        self.attention_map_alignment = attention_map_alignment
        self.padded_batches = padded_batches
        self.aux_tokens = aux_tokens
        self.prior_prob = prior_prob
        self.scorer = ForegroundTokenSelector(
            embed_dim=embed_dim, num_levels=self.num_levels, top_down=False, global_context="image"
        )
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**self.layer_args) for _ in range(num_layers)
        )
        self.aux_class_heads: Optional[nn.ModuleList] = None
        self.aux_box_heads: Optional[nn.ModuleList] = None
        if aux_heads and num_layers > 1:
            class_head, box_head = detection_heads(embed_dim, num_classes, prior_prob)
            self.aux_class_heads = clone_modules(class_head, num_layers - 1)
            self.aux_box_heads = clone_modules(box_head, num_layers - 1)

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
            logits with padded tokens filled (see ``padded_batches``), the same (B, k)
            ``layer_indices`` / ``layer_valid`` for every layer, and ``extras["aux_outputs"]``
            (training: per layer but the last, "pred_logits" (B, k, K), "pred_boxes" (B, k, 4),
            "valid" (B, k) bool or None when every gathered token counts) and
            ``extras["counts"]``: B Python ints, the tokens kept in every image.
        """
        self.check_features(features)
        padding_mask = features.padding_mask
        reference = self.padded_batches == "reference"
        scorer_input = shared_heads["memory_projection"](
            (features.tokens + features.pos).masked_fill(
                ~features.proposal_valid.unsqueeze(-1), 0.0
            )
        )
        # the global context of every image: over all its tokens ("reference") or valid ones
        context_padding = torch.zeros_like(padding_mask) if reference else padding_mask
        logits = self.scorer(scorer_input, context_padding, features.level_shapes)
        if reference:
            # Sparse DETR's fill: the batch's smallest raw logit, with gradient
            token_scores = torch.where(padding_mask, logits.min(), logits)
        else:
            token_scores = fill_padding_with_minimum(logits, padding_mask)
        # every layer updates the same tokens: one selection, shared
        selections = self.select_tokens(
            features, token_scores, (1.0,) * self.num_layers, rank_padding_last=not reference
        )
        kept = selections[0]

        def update(
            layer: int, query: torch.Tensor, selected: SelectedTokens, memory: torch.Tensor
        ) -> torch.Tensor:
            return self.layers[layer](
                query,
                selected.pos,
                selected.reference,
                memory,
                padding_mask,
                features.spatial_shapes,
                features.level_start_index,
                level_shapes=features.level_shapes,
            )

        with_aux = self.training and self.aux_class_heads is not None
        # the tokens beyond an image's budget keep their updates (the memory is the same)
        memory, outputs = self.update_tokens(
            features, selections, update, keep_written=with_aux, carry_unwritten=True
        )
        aux_outputs = []
        if with_aux:
            proposals = features.proposals.gather(1, kept.indices.unsqueeze(-1).expand(-1, -1, 4))
            aux_valid = None
            if self.aux_tokens == "written":
                aux_valid = kept.valid & features.proposal_valid.gather(1, kept.indices)
                proposals = proposals.masked_fill(~aux_valid.unsqueeze(-1), 0.0)
            # "gathered": invalid proposals are +inf, their boxes (1, 1, 1, 1) as in Sparse DETR
            for class_head, box_head, tokens in zip(
                self.aux_class_heads, self.aux_box_heads, outputs[:-1]
            ):
                aux_outputs.append(
                    {
                        "pred_logits": class_head(tokens),
                        "pred_boxes": (box_head(tokens) + proposals).sigmoid(),
                        "valid": aux_valid,
                    }
                )
        return EncoderOutput(
            memory=memory,
            layer_indices=[kept.indices] * self.num_layers,
            layer_valid=[kept.valid] * self.num_layers,
            token_scores=token_scores,
            extras={"aux_outputs": aux_outputs, "counts": kept.budgets},
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
        decoder-attention target, averaged over every token of the padded batch, the filled
        padded logits (target 0) included ("reference", Sparse DETR's
        ``multilabel_soft_margin_loss``), or over each image's valid tokens, then over images
        ("per_image"); plus the matched losses of the auxiliary heads.
        """
        target = self.saliency_target(output, inputs)
        per_token = F.binary_cross_entropy_with_logits(
            output.token_scores, target, reduction="none"
        )
        if self.padded_batches == "reference":
            saliency = per_token.mean()
        else:
            valid = ~inputs.features.padding_mask
            saliency = ((per_token * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()
        losses = {"loss_saliency": self.saliency_loss_weight * saliency}
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
            f"attention_map_alignment={self.attention_map_alignment!r}, "
            f"padded_batches={self.padded_batches!r}, aux_tokens={self.aux_tokens!r}"
        )
