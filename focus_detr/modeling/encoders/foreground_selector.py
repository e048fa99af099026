"""The Foreground Token Selector (FTS) of Focus-DETR: one foreground logit per token."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ForegroundTokenSelector"]


class ForegroundTokenSelector(nn.Module):
    """
    Scores every flattened multi-scale token with a scoring network shared by all levels, with
    top-down score modulation from coarse to fine levels:

    - the coarsest level is scored directly: ``s_{L-1} = net(x_{L-1})``;
    - every finer level ``l`` is first modulated by the raw logit map of the level above,
      upsampled bilinearly (``align_corners=True``) to the level's grid:
      ``x'_l = x_l * (1 + alpha[L-2-l] * up(s_{l+1}))``, then ``s_l = net(x'_l)``.

    The modulated features are used for scoring only. The scoring network is
    ``LN -> Linear(C, hidden) -> GELU``; the second half of the channels is averaged over the
    level's tokens of each image and broadcast back; then
    ``Linear(hidden, head_dims[0]) -> GELU -> ... -> Linear(head_dims[-1], 1)``.

    Padded tokens (``include_padding``): the official codes score them like image tokens: they
    enter the global mean, and their raw logits are upsampled into the finer level, so an
    image's scores depend on how much padding its batch adds. Without, the mean runs over the
    valid tokens and padded logits are zeroed before the upsampling: an image is scored the same
    alone or in any batch.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_levels: int = 4,
        hidden_dim: Optional[int] = None,
        head_dims: Optional[Sequence[int]] = None,
        alpha_init_range: float = 0.3,
        top_down: bool = True,
        global_context: str = "level",
        include_padding: bool = False,
    ):
        """
        Args:
            embed_dim: channels of the input tokens.
            num_levels: feature levels (>= 1); one modulation coefficient per level but the
                coarsest.
            hidden_dim: output channels of the first linear layer, split in a local and a global
                half; must be even. Default: ``embed_dim`` (reference: 256).
            head_dims: hidden widths of the layers after the split. Default:
                ``(hidden_dim // 2, hidden_dim // 4)`` (reference: 128, 64).
            alpha_init_range: modulation coefficients start uniform in
                ``[-alpha_init_range, alpha_init_range]`` (reference: 0.3).
            top_down: modulate every level by the logits of the coarser one (Focus-DETR);
                False scores every level independently (Sparse DETR's scoring network).
            global_context: the global half of the hidden channels is averaged over the tokens
                of each "level" (Focus-DETR) or of the whole "image" (Sparse DETR).
            include_padding: True (Focus-DETR's and Sparse DETR's official code): padded tokens
                enter the global mean, and the coarser level's raw logits, padded ones included,
                modulate the finer level. False: the mean runs over the valid tokens and padded
                logits are zeroed before the upsampling, so an image's valid scores do not depend
                on the padding of its batch.
        """
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        hidden_dim = embed_dim if hidden_dim is None else hidden_dim
        if hidden_dim <= 0 or hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim must be a positive even number, got {hidden_dim}")
        head_dims = (hidden_dim // 2, hidden_dim // 4) if head_dims is None else tuple(head_dims)
        if len(head_dims) == 0 or any(dim <= 0 for dim in head_dims):
            raise ValueError(
                f"head_dims must be a non-empty list of positive ints, got {head_dims}"
            )
        if alpha_init_range < 0:
            raise ValueError(f"alpha_init_range must be >= 0, got {alpha_init_range}")
        if global_context not in ("level", "image"):
            raise ValueError(f"global_context must be 'level' or 'image', got {global_context!r}")
        if top_down and global_context != "level":
            raise ValueError(
                f"top-down modulation scores level by level: global_context must be 'level', "
                f"got {global_context!r}"
            )
        self.top_down = top_down
        self.global_context = global_context
        self.include_padding = include_padding
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim
        self.alpha_init_range = alpha_init_range

        self.input_layer = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_dim), nn.GELU()
        )
        layers: List[nn.Module] = []
        in_dim = hidden_dim
        for dim in head_dims:
            layers += [nn.Linear(in_dim, dim), nn.GELU()]
            in_dim = dim
        layers.append(nn.Linear(in_dim, 1))
        self.output_layers = nn.Sequential(*layers)
        # alpha[j] modulates level L-2-j: the j-th step down from the coarsest level
        self.alpha = nn.Parameter(torch.empty(num_levels - 1)) if top_down else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.alpha is not None:
            nn.init.uniform_(self.alpha, -self.alpha_init_range, self.alpha_init_range)

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, C) tokens -> (B, n, hidden_dim) output of ``LN -> Linear -> GELU``."""
        return self.input_layer(features)

    def global_mean(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """
        Mean of the global half of ``hidden`` (B, n, hidden_dim) over the ``valid`` (B, n)
        tokens, or over all n tokens with ``include_padding``: (B, 1, hidden_dim / 2). An image
        without a valid token gets zero context (without ``include_padding``).
        """
        global_part = hidden[..., self.hidden_dim // 2 :]
        if self.include_padding:
            return global_part.mean(dim=1, keepdim=True)
        weights = valid.to(hidden.dtype).unsqueeze(-1)
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (global_part * weights).sum(dim=1, keepdim=True) / count

    def score_hidden(self, hidden: torch.Tensor, global_mean: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden_dim) hidden features + (B, 1, hidden_dim / 2) context -> (B, n) logits."""
        local_part = hidden[..., : self.hidden_dim // 2]
        hidden = torch.cat([local_part, global_mean.expand_as(local_part)], dim=-1)
        return self.output_layers(hidden).squeeze(-1)

    def score_level(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """
        The shared scoring network on the tokens of one level, with the level's own context.

        Args:
            features: (B, n, C) tokens of one level.
            valid: (B, n) bool, True on tokens inside the image; only they enter the global mean
                (unless ``include_padding``).

        Returns:
            (B, n) raw logits.
        """
        hidden = self.hidden_features(features)
        return self.score_hidden(hidden, self.global_mean(hidden, valid))

    def forward(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor,
        level_shapes: Sequence[Tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            features: (B, N, C) flattened multi-scale tokens, finest level first. In Focus-DETR
                these are ``token_projection((tokens + pos) with padding zeroed)``.
            padding_mask: (B, N) bool, True on padded tokens.
            level_shapes: L pairs (h, w) of Python ints, N = sum of h * w.

        Returns:
            (B, N) raw logits, padded tokens included (callers mask or fill them as they need).
        """
        if len(level_shapes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} level shapes, got {list(level_shapes)}")
        sizes = [height * width for height, width in level_shapes]
        if sum(sizes) != features.shape[1] or padding_mask.shape != features.shape[:2]:
            raise ValueError(
                f"features {tuple(features.shape)} and padding_mask "
                f"{tuple(padding_mask.shape)} do not match level shapes {list(level_shapes)}"
            )
        valid = ~padding_mask
        if not self.top_down:
            hidden = self.hidden_features(features)
            if self.global_context == "image":
                return self.score_hidden(hidden, self.global_mean(hidden, valid))
            return torch.cat(
                [
                    self.score_hidden(level_hidden, self.global_mean(level_hidden, level_valid))
                    for level_hidden, level_valid in zip(
                        hidden.split(sizes, dim=1), valid.split(sizes, dim=1)
                    )
                ],
                dim=1,
            )
        return self._score_top_down(features, valid, level_shapes, sizes)

    def _score_top_down(
        self,
        features: torch.Tensor,
        valid: torch.Tensor,
        level_shapes: Sequence[Tuple[int, int]],
        sizes: Sequence[int],
    ) -> torch.Tensor:
        batch = features.shape[0]
        level_features = features.split(sizes, dim=1)
        level_valid = valid.split(sizes, dim=1)
        logits: List[Optional[torch.Tensor]] = [None] * self.num_levels
        upper_map: Optional[torch.Tensor] = None
        for level in reversed(range(self.num_levels)):
            height, width = level_shapes[level]
            level_input = level_features[level]
            if upper_map is not None:
                upsampled = F.interpolate(
                    upper_map, size=(height, width), mode="bilinear", align_corners=True
                )
                alpha = self.alpha[self.num_levels - 2 - level]
                level_input = level_input * (1.0 + alpha * upsampled.flatten(1).unsqueeze(-1))
            hidden = self.hidden_features(level_input)
            level_logits = self.score_hidden(hidden, self.global_mean(hidden, level_valid[level]))
            logits[level] = level_logits
            upper_map = level_logits
            if not self.include_padding:
                # zero padded logits (no modulation) so that they cannot leak into the valid
                # border of the finer level through the interpolation
                upper_map = upper_map.masked_fill(~level_valid[level], 0.0)
            upper_map = upper_map.view(batch, 1, height, width)
        return torch.cat(logits, dim=1)
