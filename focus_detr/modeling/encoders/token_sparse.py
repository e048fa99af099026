"""Encoders whose layers update a ranked subset of the tokens (Focus, Sparse DETR): one loop."""

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from ..multi_scale import encoder_reference_points
from ..structures import FlattenedFeatures, int64_tensor
from .deformable_layer import DeformableEncoder
from .token_selection import check_keep_ratio, compute_token_budgets

__all__ = ["SelectedTokens", "TokenSparseEncoder", "TokenUpdate"]


@dataclass
class SelectedTokens:
    """
    The tokens one layer updates: the first k of the ranking, the same k for every image (a
    rectangular batch).

    Attributes:
        indices: (B, k) int64 indices in the N tokens, best ranked first.
        valid: (B, k) bool, True where the layer writes the token back: inside the image's
            budget and never a padded token.
        budgets: B Python ints, how many tokens of every image the layer writes.
        pos: (B, k, C) their position embeddings.
        reference: (B, k, L, 2) their normalized encoder reference points on every level.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    budgets: Tuple[int, ...]
    pos: torch.Tensor
    reference: torch.Tensor


# (layer index, query (B, k, C): the current memory of the selected tokens, the selection,
# memory (B, N, C): every token's current value) -> (B, k, C) updated tokens
TokenUpdate = Callable[[int, torch.Tensor, SelectedTokens, torch.Tensor], torch.Tensor]


class TokenSparseEncoder(DeformableEncoder):
    """
    Base of the encoders that rank the tokens once and let every layer update a prefix of the
    ranking, within a budget of ``keep_ratio`` of each image's valid tokens. It owns the
    select / gather / update / scatter-back loop: subclasses score the tokens and say how a
    layer updates the tokens it is given (:meth:`update_tokens`). Tokens never selected keep
    their input value; padded tokens are never written.

    The keep ratio may be changed after training (``encoder.keep_ratio = 0.3``).
    """

    has_keep_ratio = True

    def __init__(self, *, keep_ratio: float, **kwargs):
        """
        Args:
            keep_ratio: rho in (0, 1], the share of an image's valid tokens in its budget.
            kwargs: the arguments of :class:`DeformableEncoder`.
        """
        super().__init__(**kwargs)
        self.keep_ratio = keep_ratio

    @property
    def keep_ratio(self) -> float:
        """rho: the share of an image's valid tokens in its budget."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = check_keep_ratio(value)

    def select_tokens(
        self,
        features: FlattenedFeatures,
        logits: torch.Tensor,
        layer_keep_factors: Sequence[float],
        *,
        budget_rule: str = "image",
        rank_padding_last: bool = True,
        topk_per_layer: bool = False,
    ) -> List[SelectedTokens]:
        """
        One ranking for all layers (no gradient through it): layer l takes the first ``k_l``
        tokens of the ranking and image i writes its first ``b_il`` (see
        :func:`compute_token_budgets`); the budgets come from the images' valid token counts
        as Python ints, so nothing is read back from the device. Layers with the same factor as
        the layer before share its selection.

        Args:
            features: flattened tokens and geometry.
            logits: (B, N) token scores; higher ranks first.
            layer_keep_factors: c_l in (0, 1], one per layer.
            budget_rule: "image" or "batch" (the reference's), see
                :func:`compute_token_budgets`.
            rank_padding_last: True: padded tokens rank after every valid token, whatever
                ``logits`` holds; False: they rank by their entry in ``logits`` (the reference
                fills it with the batch's smallest logit, so padded tokens tie with each other).
            topk_per_layer: False: every layer takes a prefix of one ranking (nested sets);
                True: a top-``k_l`` per layer, as the reference does. The two differ only in the
                order ``torch.topk`` gives exactly tied scores, which depends on ``k``.

        Returns:
            One :class:`SelectedTokens` per layer.
        """
        padding_mask = features.padding_mask
        batch, num_tokens, channels = features.tokens.shape
        layer_sizes, budgets = compute_token_budgets(
            features.valid_token_counts, self.keep_ratio, layer_keep_factors, rule=budget_rule
        )
        ranking = logits.detach()
        if rank_padding_last:
            # -inf puts every padded token after every valid one, even on ties with the minimum
            ranking = ranking.masked_fill(padding_mask, float("-inf"))
        order = ranking.topk(min(max(layer_sizes), num_tokens), dim=1).indices
        budget_tensor = int64_tensor(budgets, order.device)  # (num_layers, B)
        reference = encoder_reference_points(features).flatten(2)
        arange = torch.arange(order.shape[1], device=order.device)
        selections: List[SelectedTokens] = []
        for layer, (factor, size) in enumerate(zip(layer_keep_factors, layer_sizes)):
            if layer > 0 and factor == layer_keep_factors[layer - 1]:
                selections.append(selections[-1])
                continue
            indices = order[:, : min(size, num_tokens)]
            num_selected = indices.shape[1]
            if topk_per_layer and num_selected < order.shape[1]:
                indices = ranking.topk(num_selected, dim=1).indices
            valid = arange[None, :num_selected] < budget_tensor[layer][:, None]
            # padded tokens are never written (with rank_padding_last, a guard only)
            valid &= ~padding_mask.gather(1, indices)
            selections.append(
                SelectedTokens(
                    indices=indices,
                    valid=valid,
                    budgets=tuple(budgets[layer]),
                    pos=features.pos.gather(1, indices.unsqueeze(-1).expand(-1, -1, channels)),
                    reference=reference.gather(
                        1, indices.unsqueeze(-1).expand(-1, -1, reference.shape[-1])
                    ).view(batch, num_selected, self.num_levels, 2),
                )
            )
        return selections

    def update_tokens(
        self,
        features: FlattenedFeatures,
        selections: Sequence[SelectedTokens],
        update: TokenUpdate,
        *,
        keep_written: bool = False,
        carry_unwritten: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Every layer gathers its selected tokens from the current memory, ``update`` computes
        their new values and the valid ones are scattered back (tokens beyond an image's budget
        are written back unchanged: one batched scatter).

        Args:
            features: flattened tokens and geometry; ``features.tokens`` is the initial memory.
            selections: one :class:`SelectedTokens` per layer (:meth:`select_tokens`).
            update: computes a layer's updated tokens (see :data:`TokenUpdate`).
            keep_written: also return what every layer wrote back (with ``carry_unwritten``:
                its output for every gathered token).
            carry_unwritten: a layer with the selection of the layer before takes that layer's
                output as its query for every gathered token, so that the tokens it does not
                write (beyond an image's budget, padding) keep their updates from layer to
                layer, as Sparse DETR's encoder does; the memory is the same either way.

        Returns:
            ``(memory (B, N, C), written)``: per layer the (B, k, C) tokens written back when
            ``keep_written``, else an empty list.
        """
        channels = features.tokens.shape[-1]
        memory = features.tokens
        written_per_layer: List[torch.Tensor] = []
        updated = None
        for layer_index, selected in enumerate(selections):
            token_index = selected.indices.unsqueeze(-1).expand(-1, -1, channels)
            current = memory.gather(1, token_index)
            query = current
            if carry_unwritten and layer_index > 0 and selected is selections[layer_index - 1]:
                # the written tokens' memory is their previous output: only unwritten ones change
                query = updated
            updated = update(layer_index, query, selected, memory)
            written = torch.where(selected.valid.unsqueeze(-1), updated, current)
            memory = memory.scatter(1, token_index, written)
            if keep_written:
                written_per_layer.append(updated if carry_unwritten else written)
        return memory, written_per_layer
