"""The Focus-DETR encoder: foreground token selection and cascade token sparsification."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .encoder_layer import FocusEncoderLayer
from .encoder_output import EncoderOutput
from .foreground_selector import ForegroundTokenSelector

__all__ = ["FocusEncoder", "compute_token_budgets", "fine_grained_scores"]

_SCORE_PRODUCTS = ("probability", "logit")
_VALUE_SOURCES = ("initial", "updated")


def compute_token_budgets(
    num_valid: torch.Tensor, keep_ratio: float, layer_keep_factors: Sequence[float]
) -> Tuple[List[int], torch.Tensor]:
    """
    How many tokens every layer gathers, and how many of them each image may write.

    Per image ``n_i = floor(keep_ratio * valid_i) + 1`` clamped to ``valid_i``, ``K = max_i n_i``.
    Layer l gathers ``k_l = max(1, floor(c_l * K))`` tokens per image (a rectangular batch) and
    image i writes its first ``b_il = min(n_i, max(1, floor(c_l * n_i)))`` of them: the cascade
    factor applies to every image's own budget, so an image is encoded exactly as it would be
    alone, whatever the other images of its batch. (The reference writes ``min(k_l, n_i)``: a
    small image next to a large one keeps its whole budget in every layer.)

    Args:
        num_valid: (B,) int64 valid (non-padded) tokens per image.
        keep_ratio: rho in (0, 1].
        layer_keep_factors: c_l in (0, 1], one per layer.

    Returns:
        ``(layer_sizes, budgets)``: k_l per layer (python ints), and (num_layers, B) int64 b_il.
    """
    num_valid = num_valid.long()
    focus = (torch.floor(num_valid.double() * keep_ratio).long() + 1).minimum(num_valid)
    max_focus = max(int(focus.max()), 1) if focus.numel() > 0 else 1
    layer_sizes = [max(1, int(factor * max_focus)) for factor in layer_keep_factors]
    budgets = [
        torch.floor(focus.double() * factor).long().clamp(min=1).minimum(focus)
        for factor in layer_keep_factors
    ]
    return layer_sizes, torch.stack(budgets)


def fine_grained_scores(
    class_logits: torch.Tensor, foreground_logits: torch.Tensor, mode: str = "probability"
) -> torch.Tensor:
    """
    The multi-category score times the foreground score, for ranking only.

    Args:
        class_logits: (B, k, K) class logits of the tokens.
        foreground_logits: (B, k) FTS logits of the tokens.
        mode: "probability": ``max_c sigmoid(class_c) * sigmoid(fts)``; "logit": the reference's
            ``max_c class_c * fts`` on raw logits, where two negative logits rank high.

    Returns:
        (B, k) scores.
    """
    best_class = class_logits.max(dim=-1).values
    if mode == "probability":
        return best_class.sigmoid() * foreground_logits.sigmoid()
    if mode == "logit":
        return best_class * foreground_logits
    raise ValueError(f"mode must be one of {_SCORE_PRODUCTS}, got {mode!r}")


class FocusEncoder(nn.Module):
    """
    Scores all tokens once with the :class:`ForegroundTokenSelector`, then lets every layer update
    a nested prefix of the score ranking (``layer_keep_factors`` of the image's foreground
    budget). Tokens never selected keep their input value; padded tokens are never written.
    """

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
        keep_ratio: float = 0.5,
        layer_keep_factors: Sequence[float] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
        topk_sa: int = 300,
        score_product: str = "probability",
        value_source: str = "initial",
        project_category_input: bool = True,
        selector_hidden_dim: Optional[int] = None,
        selector_head_dims: Optional[Sequence[int]] = None,
        selector_alpha_init_range: float = 0.3,
    ):
        """
        Args:
            embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout, topk_sa: see
                :class:`FocusEncoderLayer`.
            num_layers: encoder layers.
            keep_ratio: rho, the fraction of an image's valid tokens in its foreground budget.
            layer_keep_factors: per layer, the fraction of the budget the layer updates.
            score_product: "probability" (default) or "logit" (reference parity), see
                :func:`fine_grained_scores`.
            value_source: "initial": every layer's deformable value is the input tokens (padding
                zeroed); "updated": the current memory (the Sparse DETR choice).
            project_category_input: apply ``token_projection`` before ``category_head`` in the
                multi-category score predictor, i.e. score the tokens the way the head is trained
                in the two-stage selection; False feeds the raw tokens like the reference.
            selector_hidden_dim, selector_head_dims, selector_alpha_init_range: see
                :class:`ForegroundTokenSelector`.
        """
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        layer_keep_factors = tuple(float(factor) for factor in layer_keep_factors)
        if len(layer_keep_factors) != num_layers:
            raise ValueError(
                f"need one layer_keep_factor per layer ({num_layers}), got {layer_keep_factors}"
            )
        if any(not 0.0 < factor <= 1.0 for factor in layer_keep_factors):
            raise ValueError(f"layer_keep_factors must be in (0, 1], got {layer_keep_factors}")
        if topk_sa <= 0:
            raise ValueError(f"topk_sa must be positive, got {topk_sa}")
        if score_product not in _SCORE_PRODUCTS:
            raise ValueError(
                f"score_product must be one of {_SCORE_PRODUCTS}, got {score_product!r}"
            )
        if value_source not in _VALUE_SOURCES:
            raise ValueError(f"value_source must be one of {_VALUE_SOURCES}, got {value_source!r}")
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.keep_ratio = keep_ratio
        self.layer_keep_factors = layer_keep_factors
        self.score_product = score_product
        self.value_source = value_source
        self.project_category_input = project_category_input

        self.selector = ForegroundTokenSelector(
            embed_dim=embed_dim,
            num_levels=num_levels,
            hidden_dim=selector_hidden_dim,
            head_dims=selector_head_dims,
            alpha_init_range=selector_alpha_init_range,
        )
        self.layers = nn.ModuleList(
            FocusEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
                topk_sa=topk_sa,
            )
            for _ in range(num_layers)
        )

    def _check_inputs(self, tokens, token_pos, padding_mask, spatial_shapes, reference_points):
        batch, num_tokens, channels = tokens.shape
        if channels != self.embed_dim or token_pos.shape != tokens.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} and token_pos {tuple(token_pos.shape)} must both "
                f"be (B, N, {self.embed_dim})"
            )
        if padding_mask.shape != (batch, num_tokens):
            raise ValueError(
                f"padding_mask must be ({batch}, {num_tokens}), got {tuple(padding_mask.shape)}"
            )
        if spatial_shapes.shape != (self.num_levels, 2):
            raise ValueError(
                f"spatial_shapes must be ({self.num_levels}, 2), got {tuple(spatial_shapes.shape)}"
            )
        if int(spatial_shapes.prod(1).sum()) != num_tokens:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} do not add up to N={num_tokens} tokens"
            )
        if reference_points.shape != (batch, num_tokens, self.num_levels, 2):
            raise ValueError(
                f"reference_points must be ({batch}, {num_tokens}, {self.num_levels}, 2), got "
                f"{tuple(reference_points.shape)}"
            )

    def forward(
        self,
        tokens: torch.Tensor,
        token_pos: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        reference_points: torch.Tensor,
        token_projection: nn.Module,
        category_head: nn.Module,
    ) -> EncoderOutput:
        """
        Args:
            tokens: (B, N, C) flattened multi-scale tokens, finest level first.
            token_pos: (B, N, C) position + level embeddings.
            padding_mask: (B, N) bool, True on padded tokens.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level.
            valid_ratios: (B, L, 2); unused, ``reference_points`` already include them (kept
                for the common encoder interface).
            reference_points: (B, N, L, 2) normalized token centres.
            token_projection: the two-stage ``Linear(C, C) + LayerNorm``; it projects the
                selector's input and (``project_category_input``) the category head's input.
            category_head: the two-stage class head ``Linear(C, K)``, the multi-category score
                predictor. Neither module is trained through this encoder's selection.

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C), ``foreground_logits`` (B, N)
            (padding filled with the smallest valid logit, detached), ``layer_indices`` and
            ``layer_valid`` (B, k_l) per layer.
        """
        del valid_ratios
        self._check_inputs(tokens, token_pos, padding_mask, spatial_shapes, reference_points)
        batch, num_tokens, channels = tokens.shape
        padding = padding_mask.unsqueeze(-1)

        selector_input = token_projection((tokens + token_pos).masked_fill(padding, 0.0))
        logits = self.selector(selector_input, padding_mask, spatial_shapes)
        smallest = logits.detach().masked_fill(padding_mask, float("inf")).min()
        smallest = torch.where(smallest.isfinite(), smallest, torch.zeros_like(smallest))
        foreground_logits = torch.where(padding_mask, smallest, logits)

        # one ranking for all layers: nested index sets, no gradient through the selection;
        # -inf puts every padded token after every valid one, even on ties with the minimum
        ranking = logits.detach().masked_fill(padding_mask, float("-inf"))
        layer_sizes, budgets = compute_token_budgets(
            (~padding_mask).sum(dim=1), self.keep_ratio, self.layer_keep_factors
        )
        order = ranking.topk(min(max(layer_sizes), num_tokens), dim=1).indices

        initial_value = tokens.masked_fill(padding, 0.0)
        flat_reference = reference_points.flatten(2)
        memory = tokens
        layer_indices: List[torch.Tensor] = []
        layer_valid: List[torch.Tensor] = []
        for layer, size, budget in zip(self.layers, layer_sizes, budgets):
            indices = order[:, : min(size, num_tokens)]
            num_selected = indices.shape[1]
            valid = torch.arange(num_selected, device=tokens.device)[None, :] < budget[:, None]
            valid &= ~padding_mask.gather(1, indices)  # guard only: the -inf ranking ensures it
            token_index = indices.unsqueeze(-1).expand(-1, -1, channels)
            query = memory.gather(1, token_index)
            query_pos = token_pos.gather(1, token_index)
            query_reference = flat_reference.gather(
                1, indices.unsqueeze(-1).expand(-1, -1, flat_reference.shape[-1])
            ).view(batch, num_selected, self.num_levels, 2)
            with torch.no_grad():
                category_input = token_projection(query) if self.project_category_input else query
                scores = fine_grained_scores(
                    category_head(category_input),
                    logits.detach().gather(1, indices),
                    self.score_product,
                )
            value = initial_value if self.value_source == "initial" else memory
            updated = layer(
                query,
                query_pos,
                query_reference,
                value,
                padding_mask,
                spatial_shapes,
                level_start_index,
                scores,
                valid,
            )
            # tokens beyond the image's budget are written back unchanged: one batched scatter
            updated = torch.where(valid.unsqueeze(-1), updated, query)
            memory = memory.scatter(1, token_index, updated)
            layer_indices.append(indices)
            layer_valid.append(valid)
        return EncoderOutput(
            memory=memory,
            foreground_logits=foreground_logits,
            layer_indices=layer_indices,
            layer_valid=layer_valid,
        )
