"""The Focus-DETR encoder: foreground token selection and cascade token sparsification."""

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structures import EncoderOutput, FlattenedFeatures
from .base import EncoderLossInputs
from .focus_layer import FocusEncoderLayer
from .foreground_selector import ForegroundTokenSelector
from .foreground_targets import ForegroundLoss
from .token_selection import SCORE_PRODUCTS, fill_padding_with_minimum, fine_grained_scores
from .token_sparse import SelectedTokens, TokenSparseEncoder

__all__ = ["FocusEncoder"]

_VALUE_SOURCES = ("initial", "updated")
_SELECTOR_MASKS = ("proposals", "padding")
PADDED_BATCHES = ("reference", "per_image")


class FocusEncoder(TokenSparseEncoder):
    """
    Focus-DETR's encoder. Scores all tokens once with the :class:`ForegroundTokenSelector`, then
    lets every layer update a nested prefix of the score ranking (``layer_keep_factors`` of the
    image's foreground budget ``keep_ratio``); inside a layer the ``topk_sa`` tokens with the
    best fine-grained score (multi-category score x foreground score) first attend to each other
    (dual attention). Tokens never selected keep their input value; padded tokens are never
    written. Its loss is the selector's focal loss on FCOS-style foreground targets.

    On a padded batch ``padded_batches`` says how padding and the other images of the batch
    enter an image's encoding (both choices agree on a batch of one image): "reference" as
    detrex, "per_image" so that an image is encoded the same alone or in any batch.

    Shared heads: ``memory_projection`` (the two-stage ``Linear + LayerNorm``, which projects
    the selector's input) and ``class_head`` (the two-stage class head, the multi-category score
    predictor). The keep ratio may be changed after training (``encoder.keep_ratio = 0.3``).
    """

    shared_heads = ("memory_projection", "class_head")

    def __init__(
        self,
        *,
        keep_ratio: float = 0.5,
        layer_keep_factors: Sequence[float] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
        topk_sa: int = 300,
        score_product: str = "logit",
        project_category_input: bool = False,
        selector_input_mask: str = "proposals",
        value_source: str = "initial",
        padded_batches: str = "reference",
        selector_hidden_dim: Optional[int] = None,
        selector_head_dims: Optional[Sequence[int]] = None,
        selector_alpha_init_range: float = 0.3,
        foreground_ranges: Optional[Sequence[Tuple[float, float]]] = None,
        foreground_loss_weight: float = 1.5,
        foreground_focal_alpha: float = 0.25,
        foreground_focal_gamma: float = 2.0,
        **kwargs,
    ):
        """
        Args:
            keep_ratio: rho in (0, 1], the fraction of an image's valid tokens in its foreground
                budget (reference 0.5).
            layer_keep_factors: per layer, the fraction of the budget the layer updates, in
                (0, 1] (reference 1.0, 0.8, 0.6, 0.6, 0.4, 0.2).
            topk_sa: tokens per image in the dual attention, see :class:`FocusEncoderLayer`.
            score_product: how the dual attention ranks tokens: "logit" (reference: product of
                the raw class and foreground logits) or "probability" (product of sigmoids), see
                :func:`fine_grained_scores`.
            project_category_input: False (reference): the class head scores the raw tokens;
                True: the tokens after ``memory_projection``, the input the head is trained on.
            selector_input_mask: "proposals" (reference): tokens whose two-stage proposal is
                invalid (padding and the outer ring of the fine levels) are zeroed before the
                selector's projection; "padding": only padded tokens are.
            value_source: "initial" (reference): every layer's deformable value is the input
                tokens (padding zeroed); "updated": the current memory (Sparse DETR's choice).
            padded_batches: how a padded batch is encoded; both choices give the same result
                on a batch of one image.

                - "reference" (detrex): (1) the cascade factor applies to the batch's largest
                  budget K: layer l gathers ``k_l = floor(c_l * K)`` tokens and image i writes
                  the first ``min(k_l, n_i)`` (see :func:`compute_token_budgets`, rule
                  "batch"); (2) the selector's global mean runs over every token of the level,
                  padding included, and (3) the coarser level's raw logits, padded ones
                  included, modulate the finer level; (4) padded logits are filled with the
                  batch's smallest raw logit (padding included) for the ranking and the dual
                  attention's fine-grained score, and every layer runs its own top-k (exactly
                  tied padded tokens resolve as in the reference); (5) the dual attention's
                  candidates are all the tokens the layer gathered, beyond the image's budget
                  and gathered padding included; (6) the focal loss counts padded tokens as
                  negatives, with their raw logits.
                - "per_image": an image's encoding and loss do not depend on the other images
                  of its batch or on its padding: image i writes ``min(n_i, max(1, floor(c_l *
                  n_i)))``, the global mean runs over valid tokens, padded logits are zeroed
                  before the upsampling and rank last (one ranking, nested per layer), the dual
                  attention picks among the tokens the image writes, and the loss leaves
                  padding out. (The backbone and the neck still see the padding.)
            selector_hidden_dim, selector_head_dims, selector_alpha_init_range: see
                :class:`ForegroundTokenSelector`.
            foreground_ranges: per level (lo, hi] of the box's max distance to a location for
                the foreground targets; default: the reference ranges (see
                ``default_size_ranges``).
            foreground_loss_weight: weight of the selector's loss (reference 1.5).
            foreground_focal_alpha, foreground_focal_gamma: its focal loss parameters.
            kwargs: ``embed_dim``, ``num_layers``, ``num_heads``, ``num_levels``, ``num_points``,
                ``ffn_dim``, ``dropout``: see :class:`DeformableEncoder`.
        """
        super().__init__(keep_ratio=keep_ratio, **kwargs)
        num_layers, num_levels = self.num_layers, self.num_levels
        layer_keep_factors = tuple(float(factor) for factor in layer_keep_factors)
        if len(layer_keep_factors) != num_layers:
            raise ValueError(
                f"need one layer_keep_factor per layer ({num_layers}), got {layer_keep_factors}"
            )
        if any(not 0.0 < factor <= 1.0 for factor in layer_keep_factors):
            raise ValueError(f"layer_keep_factors must be in (0, 1], got {layer_keep_factors}")
        if topk_sa <= 0:
            raise ValueError(f"topk_sa must be positive, got {topk_sa}")
        for name, value, allowed in (
            ("score_product", score_product, SCORE_PRODUCTS),
            ("value_source", value_source, _VALUE_SOURCES),
            ("selector_input_mask", selector_input_mask, _SELECTOR_MASKS),
            ("padded_batches", padded_batches, PADDED_BATCHES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.layer_keep_factors = layer_keep_factors
        self.score_product = score_product
        self.project_category_input = project_category_input
        self.selector_input_mask = selector_input_mask
        self.value_source = value_source
        self.padded_batches = padded_batches
        reference_padding = padded_batches == "reference"

        self.selector = ForegroundTokenSelector(
            embed_dim=self.embed_dim,
            num_levels=num_levels,
            hidden_dim=selector_hidden_dim,
            head_dims=selector_head_dims,
            alpha_init_range=selector_alpha_init_range,
            include_padding=reference_padding,
        )
        self.layers = nn.ModuleList(
            FocusEncoderLayer(topk_sa=topk_sa, **self.layer_args) for _ in range(num_layers)
        )
        self.foreground_loss = ForegroundLoss(
            num_levels=num_levels,
            ranges=foreground_ranges,
            alpha=foreground_focal_alpha,
            gamma=foreground_focal_gamma,
            weight=foreground_loss_weight,
            include_padding=reference_padding,
        )

    def score_tokens(
        self, features: FlattenedFeatures, token_projection: nn.Module
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Returns:
            ``(logits, foreground_logits)``: (B, N) raw selector logits with gradient, and the
            same with padded tokens filled (detached fill) with the batch's smallest logit,
            padded ones included ("reference", the tensor the tokens are ranked by), or with
            the smallest valid logit ("per_image").
        """
        padding_mask = features.padding_mask
        if self.selector_input_mask == "proposals":
            zeroed = ~features.proposal_valid
        else:
            zeroed = padding_mask
        selector_input = token_projection(
            (features.tokens + features.pos).masked_fill(zeroed.unsqueeze(-1), 0.0)
        )
        logits = self.selector(selector_input, padding_mask, features.level_shapes)
        if self.padded_batches == "reference":
            return logits, logits.masked_fill(padding_mask, logits.detach().min())
        return logits, fill_padding_with_minimum(logits, padding_mask)

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened tokens and geometry.
            shared_heads: ``memory_projection`` and ``class_head`` of the query selection; the
                selection never trains them (no gradient flows through a ranking).

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C), ``token_scores`` (B, N) foreground
            logits with padded tokens filled (see :meth:`score_tokens`), ``layer_indices`` and
            ``layer_valid`` (B, k_l) per layer, and ``extras["foreground_logits"]``: the raw
            (B, N) logits the loss trains.
        """
        self.check_features(features)
        token_projection = shared_heads["memory_projection"]
        category_head = shared_heads["class_head"]
        padding_mask = features.padding_mask
        logits, foreground_logits = self.score_tokens(features, token_projection)
        reference_padding = self.padded_batches == "reference"
        selections = self.select_tokens(
            features,
            foreground_logits,
            self.layer_keep_factors,
            budget_rule="batch" if reference_padding else "image",
            rank_padding_last=not reference_padding,
            topk_per_layer=reference_padding,
        )
        initial_value = features.tokens.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        ranking_logits = foreground_logits.detach()

        def update(
            layer: int, query: torch.Tensor, selected: SelectedTokens, memory: torch.Tensor
        ) -> torch.Tensor:
            with torch.no_grad():
                category_input = token_projection(query) if self.project_category_input else query
                scores = fine_grained_scores(
                    category_head(category_input),
                    ranking_logits.gather(1, selected.indices),
                    self.score_product,
                )
            # the dual attention's candidates: every gathered token (reference) or the tokens
            # the image writes back
            candidates = torch.ones_like(selected.valid) if reference_padding else selected.valid
            return self.layers[layer](
                query,
                selected.pos,
                selected.reference,
                initial_value if self.value_source == "initial" else memory,
                padding_mask,
                features.spatial_shapes,
                features.level_start_index,
                scores,
                candidates,
                level_shapes=features.level_shapes,
            )

        memory, _ = self.update_tokens(features, selections, update)
        return EncoderOutput(
            memory=memory,
            layer_indices=[selected.indices for selected in selections],
            layer_valid=[selected.valid for selected in selections],
            token_scores=foreground_logits,
            extras={"foreground_logits": logits},
        )

    def losses(self, output: EncoderOutput, inputs: EncoderLossInputs) -> Dict[str, torch.Tensor]:
        """``loss_foreground``: the weighted focal loss of the foreground token selector."""
        features = inputs.features
        return {
            "loss_foreground": self.foreground_loss(
                output.extras["foreground_logits"],
                features.padding_mask,
                features.level_shapes,
                features.strides,
                [target["boxes_xyxy"] for target in inputs.targets],
            )
        }

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, layer_keep_factors={self.layer_keep_factors}, "
            f"score_product={self.score_product!r}, "
            f"project_category_input={self.project_category_input}, "
            f"selector_input_mask={self.selector_input_mask!r}, "
            f"value_source={self.value_source!r}, padded_batches={self.padded_batches!r}"
        )
