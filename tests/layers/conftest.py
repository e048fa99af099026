"""Inputs of the multi-scale deformable attention tests."""

from typing import Callable, Sequence, Tuple

import pytest
import torch

from focus_detr.layers.ms_deform_attn_op import compiled_kernel_available

MsdaInputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Odd sizes on purpose: no level is square or a power of two.
ODD_LEVELS = ((7, 9), (4, 5), (2, 3), (1, 1))


def make_msda_inputs(
    *,
    batch: int = 2,
    num_queries: int = 6,
    num_heads: int = 2,
    head_dim: int = 5,
    levels: Sequence[Tuple[int, int]] = ODD_LEVELS,
    num_points: int = 3,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    margin: float = 0.25,
    seed: int = 0,
) -> MsdaInputs:
    """
    Random inputs; sampling locations are uniform in [-margin, 1 + margin], so some samples are
    partly or fully outside their level.

    Returns:
        (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_values = int(sizes.sum())
    num_levels = len(levels)
    value = torch.randn(batch, num_values, num_heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(
        batch, num_queries, num_heads, num_levels, num_points, 2, generator=generator, dtype=dtype
    )
    locations = locations * (1 + 2 * margin) - margin
    weights = torch.rand(
        batch, num_queries, num_heads, num_levels, num_points, generator=generator, dtype=dtype
    )
    tensors = (value, spatial_shapes, level_start_index, locations, weights)
    return tuple(t.to(device) for t in tensors)


@pytest.fixture
def msda_inputs() -> Callable[..., MsdaInputs]:
    """Factory of random inputs, see :func:`make_msda_inputs`."""
    return make_msda_inputs


@pytest.fixture
def compiled_cpu() -> None:
    """Skips the test when the CPU kernels of focus_detr._C are not loaded."""
    if not compiled_kernel_available("cpu"):
        pytest.skip(
            "focus_detr._C is not loaded (not built: run `pip install --no-build-isolation -e .`,"
            " or disabled with FOCUS_DETR_DISABLE_EXTENSION=1)"
        )
