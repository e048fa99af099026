"""fvcore FLOP handles against hand counts (one multiply-add = one flop) on known shapes."""

import pytest
import torch
from torch import nn

from focus_detr.layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention
from focus_detr.layers.flop_count import ALL_FLOP_HANDLES

fvcore_nn = pytest.importorskip("fvcore.nn")

BATCH, QUERIES, KEYS, EMBED, HEADS = 2, 5, 7, 16, 2
LEVELS = ((6, 7), (3, 4))
NUM_VALUES, POINTS = 6 * 7 + 3 * 4, 3


def _by_operator(module, inputs):
    analysis = fvcore_nn.FlopCountAnalysis(module, inputs).set_op_handle(**ALL_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return dict(analysis.by_operator()), analysis.total()


class _Attention(nn.Module):
    """nn.MultiheadAttention (batch first) as the model calls it: queries and keys share a
    tensor, values differ, unless ``self_attention`` (query = key = value)."""

    def __init__(self, *, need_weights: bool, self_attention: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
        self.need_weights = need_weights
        self.self_attention = self_attention

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.self_attention:
            return self.attention(query, query, query, need_weights=self.need_weights)[0]
        return self.attention(query, memory, memory, need_weights=self.need_weights)[0]


def _attention_inputs():
    return torch.randn(BATCH, QUERIES, EMBED), torch.randn(BATCH, KEYS, EMBED)


# projections of nn.MultiheadAttention: query, key, value, output
PROJECTIONS = BATCH * (QUERIES + KEYS + KEYS + QUERIES) * EMBED * EMBED
# query @ key^T and weights @ value, all heads: 2 * B * Lq * S * (E / H) * H
PRODUCTS = 2 * BATCH * QUERIES * KEYS * EMBED


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scaled_dot_product_attention_of_multihead_attention(mode):
    module = getattr(_Attention(need_weights=False), mode)()
    counts, total = _by_operator(module, _attention_inputs())
    assert counts["scaled_dot_product_attention"] == PRODUCTS
    assert counts["linear"] == PROJECTIONS
    assert total == PROJECTIONS + PRODUCTS


def test_need_weights_path_is_counted_by_fvcore_alike():
    # with need_weights=True the same products are two aten::bmm, which fvcore counts itself
    counts, total = _by_operator(_Attention(need_weights=True).train(), _attention_inputs())
    assert counts["bmm"] == PRODUCTS and total == PROJECTIONS + PRODUCTS


def test_native_multi_head_attention_fast_path():
    module = _Attention(need_weights=False, self_attention=True).eval()
    inputs = _attention_inputs()
    with torch.no_grad():  # the fast path needs eval mode, no autograd and self-attention
        counts, total = _by_operator(module, inputs)
    assert set(counts) == {"_native_multi_head_attention"}
    projections = BATCH * 4 * QUERIES * EMBED * EMBED
    assert total == projections + 2 * BATCH * QUERIES * QUERIES * EMBED


class _FlashForCpu(nn.Module):
    def forward(self, query, key, value):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[0]


def test_fused_scaled_dot_product_attention_variant():
    query = torch.randn(BATCH, HEADS, QUERIES, 8)
    key, value = torch.randn(BATCH, HEADS, KEYS, 8), torch.randn(BATCH, HEADS, KEYS, 8)
    counts, total = _by_operator(_FlashForCpu(), (query, key, value))
    assert total == counts["_scaled_dot_product_flash_attention_for_cpu"]
    assert total == BATCH * HEADS * QUERIES * KEYS * (8 + 8)


def _deformable_inputs():
    shapes = torch.tensor(LEVELS)
    starts = torch.tensor([0, LEVELS[0][0] * LEVELS[0][1]])
    return (
        torch.randn(BATCH, QUERIES, EMBED),
        torch.rand(BATCH, QUERIES, len(LEVELS), 2),
        torch.randn(BATCH, NUM_VALUES, EMBED),
        shapes,
        starts,
    )


SAMPLES = BATCH * QUERIES * HEADS * len(LEVELS) * POINTS  # B * Nq * H * L * P
HEAD_DIM = EMBED // HEADS
OFFSETS = BATCH * QUERIES * EMBED * HEADS * len(LEVELS) * POINTS * 2


def test_deformable_attention():
    module = MultiScaleDeformableAttention(
        embed_dim=EMBED, num_heads=HEADS, num_levels=len(LEVELS), num_points=POINTS
    )
    counts, total = _by_operator(module, _deformable_inputs())
    assert counts["ms_deform_attn"] == SAMPLES * HEAD_DIM * 5
    weights = BATCH * QUERIES * EMBED * HEADS * len(LEVELS) * POINTS
    projections = BATCH * (NUM_VALUES + QUERIES) * EMBED * EMBED
    assert counts["linear"] == OFFSETS + weights + projections
    assert total == counts["linear"] + counts["ms_deform_attn"]


def test_key_aware_deformable_attention():
    module = KeyAwareDeformableAttention(
        embed_dim=EMBED, num_heads=HEADS, num_levels=len(LEVELS), num_points=POINTS
    )
    counts, total = _by_operator(module, _deformable_inputs())
    assert counts["ms_deform_attn"] == SAMPLES * HEAD_DIM * 5
    assert counts["grid_sampler"] == SAMPLES * HEAD_DIM * 4  # bilinear keys (fvcore's handle)
    assert counts["matmul"] == SAMPLES * HEAD_DIM  # query . sampled key
    # query, value (= key) and output projections, and the offsets
    projections = BATCH * (2 * QUERIES + NUM_VALUES) * EMBED * EMBED
    assert counts["linear"] == OFFSETS + projections
    assert total == sum(counts.values())
