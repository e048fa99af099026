"""Box coordinates in logit space, as the DETR family refines them."""

import torch

__all__ = ["inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """
    The logit of ``x`` clamped to [0, 1], with numerator and denominator each clamped to at least
    ``eps`` (1e-3, as the reference DETRs). Not ``torch.logit(x, eps)``: that clamps ``x`` itself
    to ``[eps, 1 - eps]`` and differs from the reference for ``x < eps`` or ``x > 1 - eps``
    (e.g. 0 gives log(1e-3 / 1) here and log(1e-3 / 0.999) there).

    Args:
        x: (...) values, usually sigmoid-space box coordinates.
        eps: lower bound of ``x`` and ``1 - x`` inside the logarithm.

    Returns:
        (...) tensor of the same shape and dtype.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
