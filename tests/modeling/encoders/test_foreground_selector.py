import pytest
import torch
import torch.nn.functional as F

from focus_detr.modeling.encoders.foreground_selector import ForegroundTokenSelector

C = 16
ODD_SHAPES = [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)]


def padding_mask(shapes, valid_sizes):
    """(B, N) mask from per-image (h, w) valid sizes of every level."""
    rows = []
    for sizes in valid_sizes:
        levels = []
        for (h, w), (vh, vw) in zip(shapes, sizes):
            mask = torch.ones(h, w, dtype=torch.bool)
            mask[:vh, :vw] = False
            levels.append(mask.flatten())
        rows.append(torch.cat(levels))
    return torch.stack(rows)


@pytest.mark.parametrize("num_levels", [1, 3, 4, 5])
def test_shapes_and_alpha(num_levels):
    torch.manual_seed(0)
    shapes = ODD_SHAPES[:num_levels]
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=num_levels)
    num_tokens = sum(h * w for h, w in shapes)
    features = torch.randn(2, num_tokens, C)
    mask = torch.zeros(2, num_tokens, dtype=torch.bool)
    logits = selector(features, mask, shapes)
    assert logits.shape == (2, num_tokens)
    assert torch.isfinite(logits).all()
    assert selector.alpha.shape == (num_levels - 1,)
    assert (selector.alpha.abs() <= 0.3).all()


def test_reference_default_widths():
    selector = ForegroundTokenSelector()
    widths = [m.out_features for m in selector.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 128, 64, 1]


def test_top_down_modulation_by_hand():
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=2)
    with torch.no_grad():
        selector.alpha.fill_(0.7)
    features = torch.randn(1, 30, C)
    valid = torch.ones(1, 30, dtype=torch.bool)
    logits = selector(features, ~valid, shapes)

    top = selector.score_level(features[:, 24:], valid[:, 24:])
    upsampled = F.interpolate(
        top.view(1, 1, 2, 3), size=(4, 6), mode="bilinear", align_corners=True
    )
    modulated = features[:, :24] * (1 + 0.7 * upsampled.flatten(1)[..., None])
    fine = selector.score_level(modulated, valid[:, :24])
    torch.testing.assert_close(logits, torch.cat([fine, top], dim=1))

    # top-down only: fine features never change coarse scores; alpha = 0 removes the modulation
    changed = features.clone()
    changed[:, :24] += 1.0
    torch.testing.assert_close(selector(changed, ~valid, shapes)[:, 24:], top)
    with torch.no_grad():
        selector.alpha.zero_()
    plain = selector.score_level(features[:, :24], valid[:, :24])
    torch.testing.assert_close(selector(features, ~valid, shapes)[:, :24], plain)


def test_global_mean_ignores_padding_and_batch():
    torch.manual_seed(0)
    shapes = [(6, 5), (3, 3)]
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=2)
    mask = padding_mask(shapes, [[(6, 5), (3, 3)], [(4, 3), (2, 2)]])
    features = torch.randn(2, 39, C)
    logits = selector(features, mask, shapes)

    # padded features, however wild, never reach valid scores (masked mean, zeroed upsampling)
    noisy = torch.where(mask[..., None], 100 * torch.randn_like(features), features)
    noisy_logits = selector(noisy, mask, shapes)
    torch.testing.assert_close(noisy_logits[~mask], logits[~mask])

    # an image is scored the same alone or next to a larger image
    alone = selector(features[1:], mask[1:], shapes)
    torch.testing.assert_close(alone[~mask[1:]], logits[1][~mask[1]])


def test_with_padding_included_by_hand():
    """
    ``include_padding`` (the reference): the global half is averaged over every token of the
    level, padding included, and the coarse level's raw logits, padded ones included, are
    upsampled into the finer level. Image 1 keeps 4 x 3 of 6 x 5 and 2 x 2 of 3 x 3 cells.

    The modulation ``x * (1 + alpha * up)`` scales each token by one number, which the scoring
    network's first LayerNorm removes unless the number is negative: alpha = 10 flips the sign
    of a token, so that the raw padded logits make a difference.
    """
    torch.manual_seed(0)
    shapes = [(6, 5), (3, 3)]
    mask = padding_mask(shapes, [[(6, 5), (3, 3)], [(4, 3), (2, 2)]])
    features = torch.randn(2, 39, C, dtype=torch.float64)
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=2, include_padding=True).double()
    with torch.no_grad():
        selector.alpha.fill_(10.0)
    logits = selector(features, mask, shapes)

    def score(x):  # the scoring network with the plain mean over all the level's tokens
        hidden = selector.hidden_features(x)
        context = hidden[..., C // 2 :].mean(dim=1, keepdim=True)
        local = hidden[..., : C // 2]
        return selector.output_layers(torch.cat([local, context.expand_as(local)], -1))[..., 0]

    def fine_level(top_map):
        up = F.interpolate(
            top_map.view(2, 1, 3, 3), size=(6, 5), mode="bilinear", align_corners=True
        )
        return score(features[:, :30] * (1 + 10.0 * up.flatten(1)[..., None]))

    top = score(features[:, 30:])
    torch.testing.assert_close(logits, torch.cat([fine_level(top), top], dim=1))
    # zeroing the padded logits before the upsampling would change the fine level
    zeroed = fine_level(top.masked_fill(mask[:, 30:], 0.0))
    assert not torch.allclose(zeroed, logits[:, :30])

    # the padding now changes the image's valid scores, which the default never lets it do
    noisy = torch.where(mask[..., None], 100 * torch.randn_like(features), features)
    assert not torch.allclose(selector(noisy, mask, shapes)[~mask], logits[~mask])
    selector.include_padding = False
    torch.testing.assert_close(
        selector(noisy, mask, shapes)[~mask], selector(features, mask, shapes)[~mask]
    )
    # on the coarsest level the mean alone differs: equal for the unpadded image 0 only
    without = selector(features, mask, shapes)
    torch.testing.assert_close(without[0, 30:], top[0])
    assert not torch.allclose(without[1, 30:], top[1])


def test_gradients_reach_parameters_and_inputs():
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2), (1, 1)]
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=3)
    features = torch.randn(2, 21, C, requires_grad=True)
    logits = selector(features, torch.zeros(2, 21, dtype=torch.bool), shapes)
    logits.square().sum().backward()
    assert features.grad.abs().sum() > 0
    for name, parameter in selector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_levels": 0}, "num_levels.*0"),
        ({"hidden_dim": 15}, "hidden_dim.*15"),
        ({"head_dims": (8, 0)}, r"\(8, 0\)"),
        ({"alpha_init_range": -0.1}, "-0.1"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForegroundTokenSelector(embed_dim=C, **kwargs)


def test_mismatched_inputs():
    selector = ForegroundTokenSelector(embed_dim=C, num_levels=2)
    with pytest.raises(ValueError, match="expected 2 level shapes"):
        selector(torch.randn(1, 5, C), torch.zeros(1, 5, dtype=torch.bool), [(2, 2)])
    with pytest.raises(ValueError, match="do not match"):
        selector(torch.randn(1, 6, C), torch.zeros(1, 6, dtype=torch.bool), [(2, 2), (1, 1)])


def test_without_top_down_every_level_is_scored_alone():
    """Sparse DETR's scoring network: no modulation, context per level or per image."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    features = torch.randn(1, 30, C)
    valid = torch.ones(1, 30, dtype=torch.bool)
    per_level = ForegroundTokenSelector(embed_dim=C, num_levels=2, top_down=False)
    assert per_level.alpha is None
    logits = per_level(features, ~valid, shapes)
    expected = torch.cat(
        [
            per_level.score_level(features[:, :24], valid[:, :24]),
            per_level.score_level(features[:, 24:], valid[:, 24:]),
        ],
        dim=1,
    )
    torch.testing.assert_close(logits, expected)

    per_image = ForegroundTokenSelector(
        embed_dim=C, num_levels=2, top_down=False, global_context="image"
    )
    torch.testing.assert_close(
        per_image(features, ~valid, shapes), per_image.score_level(features, valid)
    )
    with pytest.raises(ValueError, match="global_context"):
        ForegroundTokenSelector(embed_dim=C, num_levels=2, global_context="image")
