import math

import helpers
import pytest
import torch

from focus_detr.modeling.criterion import SetCriterion, set_outputs
from focus_detr.modeling.denoising import ContrastiveDenoising
from focus_detr.modeling.matcher import HungarianMatcher

NUM_CLASSES = 3


def _criterion(**kwargs):
    return SetCriterion(num_classes=NUM_CLASSES, matcher=HungarianMatcher(), **kwargs)


def _targets(*counts):
    return [
        {
            "labels": torch.randint(0, NUM_CLASSES, (count,)),
            "boxes": torch.cat(
                [torch.rand(count, 2) * 0.4 + 0.3, torch.rand(count, 2) * 0.2 + 0.1], 1
            ),
        }
        for count in counts
    ]


def _decoder_outputs(layers, batch, queries):
    logits = torch.randn(layers, batch, queries, NUM_CLASSES, requires_grad=True)
    boxes = torch.rand(layers, batch, queries, 4).clamp(0.05, 0.95).requires_grad_()
    return logits, boxes


def test_hand_worked_single_box():
    # K = 1, Q = 2, all logits 0 (p = 0.5); one GT (0.5, 0.5, 0.2, 0.2); prediction 0 is shifted
    # by 0.1 in x, prediction 1 is far away, so the matcher picks prediction 0.
    criterion = SetCriterion(num_classes=1, matcher=HungarianMatcher(), denoising=False)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    outputs = {
        "pred_logits": torch.zeros(1, 2, 1),
        "pred_boxes": torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    # focal: positive 0.25 * 0.5^2 * ln 2, negative 0.75 * 0.5^2 * ln 2; one box -> / 1
    focal = 0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)
    assert losses["loss_class"].item() == pytest.approx(focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - 1 / 3), rel=1e-5)


def test_perfect_boxes_have_zero_box_loss():
    targets = _targets(2)
    boxes = torch.cat([targets[0]["boxes"], torch.tensor([[0.1, 0.1, 0.1, 0.1]])])[None]
    logits = torch.full((1, 3, NUM_CLASSES), -10.0)
    logits[0, [0, 1], targets[0]["labels"]] = 10.0
    losses = _criterion(denoising=False)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_class"].item() < 1e-3


def test_all_keys_with_aux_enc_and_dn():
    torch.manual_seed(0)
    targets = _targets(2, 1)
    dn = ContrastiveDenoising(num_classes=NUM_CLASSES, hidden_dim=8, dn_number=4)(targets, 5)
    logits, boxes = _decoder_outputs(3, 2, dn.pad_size + 5)
    enc_logits, enc_boxes = _decoder_outputs(1, 2, 5)
    (matching_logits, matching_boxes), dn_outputs = dn.split_outputs(logits, boxes)
    outputs = set_outputs(
        matching_logits,
        matching_boxes,
        enc_logits=enc_logits[0],
        enc_boxes=enc_boxes[0],
        dn_outputs=dn_outputs,
    )
    assert outputs["pred_logits"].shape == (2, 5, NUM_CLASSES)
    assert len(outputs["aux_outputs"]) == 2 and len(outputs["dn_outputs"]) == 3
    assert outputs["dn_outputs"][0]["pred_boxes"].shape == (2, dn.pad_size, 4)
    losses = _criterion()(outputs, targets, dn)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    expected = {f"{base}{s}" for base in ("loss_class", "loss_bbox", "loss_giou") for s in suffixes}
    assert set(losses) == expected
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0
    assert enc_logits.grad.abs().sum() > 0 and enc_boxes.grad.abs().sum() > 0


def test_empty_targets_finite_and_connected():
    targets = _targets(0, 0)
    logits, boxes = _decoder_outputs(2, 2, 4)
    outputs = set_outputs(logits, boxes, enc_logits=logits[0], enc_boxes=boxes[0])
    losses = _criterion()(outputs, targets, None)
    # DN keys are still reported (zero) so that every process logs the same keys
    assert "loss_class_dn" in losses and "loss_bbox_dn_0" in losses
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        if "bbox" in name or "giou" in name or "_dn" in name:
            assert value.item() == 0.0
            assert value.requires_grad, name
    assert losses["loss_class"].item() > 0
    sum(losses.values()).backward()
    assert boxes.grad is not None and torch.all(boxes.grad == 0)
    # everything is background: the focal loss lowers every logit
    assert torch.all(logits.grad > 0)


def test_dn_loss_ignores_padding_and_divides_by_groups():
    torch.manual_seed(0)
    targets = _targets(2, 1)
    denoiser = ContrastiveDenoising(
        num_classes=NUM_CLASSES, hidden_dim=8, dn_number=4, box_noise_scale=0.0
    )
    dn = denoiser(targets, 3)
    criterion = _criterion()
    logits = torch.randn(1, 2, dn.pad_size, NUM_CLASSES)
    boxes = torch.rand(1, 2, dn.pad_size, 4).clamp(0.05, 0.95)
    dn_outputs = [{"pred_logits": logits[0], "pred_boxes": boxes[0]}]
    outputs = {
        "pred_logits": torch.zeros(2, 3, NUM_CLASSES),
        "pred_boxes": torch.rand(2, 3, 4),
        "dn_outputs": dn_outputs,
    }
    losses = criterion(outputs, targets, dn)
    # changing the padding slots changes nothing
    padded = logits.clone()
    padded[0][dn.slot_padding_mask] = 50.0
    boxes_padded = boxes.clone()
    boxes_padded[0][dn.slot_padding_mask] = 0.9
    outputs["dn_outputs"] = [{"pred_logits": padded[0], "pred_boxes": boxes_padded[0]}]
    again = criterion(outputs, targets, dn)
    for name in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn"):
        assert torch.allclose(losses[name], again[name])
    # normalisation: num_boxes (3) x groups (2); boxes only on the positives
    raw = criterion.set_losses(
        logits[0], boxes[0], targets, dn.positive_indices, torch.tensor(1.0), ~dn.slot_padding_mask
    )
    assert torch.allclose(losses["loss_bbox_dn"], 5.0 * raw["loss_bbox"] / 6)
    assert torch.allclose(losses["loss_class_dn"], raw["loss_class"] / 6)
    # positives: image 0 slots 0, 1, 4, 5 -> GTs 0, 1, 0, 1; image 1 slots 0, 4 -> GT 0 twice
    positives = torch.cat([boxes[0][0, [0, 1, 4, 5]], boxes[0][1, [0, 4]]])
    gt = torch.cat([targets[0]["boxes"][[0, 1, 0, 1]], targets[1]["boxes"][[0, 0]]])
    assert torch.allclose(raw["loss_bbox"], (positives - gt).abs().sum())


def test_weight_dict_overrides_and_validation():
    targets = _targets(1)
    outputs = {"pred_logits": torch.randn(1, 4, NUM_CLASSES), "pred_boxes": torch.rand(1, 4, 4)}
    base = _criterion(denoising=False)(outputs, targets)
    weighted = _criterion(denoising=False, weight_dict={"loss_bbox": 1.0, "loss_class": 2.0})(
        outputs, targets
    )
    assert torch.allclose(weighted["loss_bbox"], base["loss_bbox"] / 5.0)
    assert torch.allclose(weighted["loss_class"], base["loss_class"] * 2.0)
    assert _criterion(weight_dict={"loss_giou_enc": 0.5}).weight("loss_giou_enc") == 0.5
    assert _criterion().weight("loss_giou_dn_3") == 2.0
    with pytest.raises(ValueError, match="loss_mask"):
        _criterion(weight_dict={"loss_mask": 1.0})
    with pytest.raises(ValueError):
        SetCriterion(num_classes=0, matcher=HungarianMatcher())


def test_dn_meta_and_outputs_must_come_together():
    torch.manual_seed(0)
    targets = _targets(1)
    dn = ContrastiveDenoising(num_classes=NUM_CLASSES, hidden_dim=8)(targets, 4)
    outputs = {"pred_logits": torch.randn(1, 4, NUM_CLASSES), "pred_boxes": torch.rand(1, 4, 4)}
    with pytest.raises(ValueError, match="dn_meta"):
        _criterion()(outputs, targets, dn)


def test_num_boxes_clamped_without_distributed():
    assert SetCriterion.num_boxes(_targets(0, 0), torch.device("cpu")).item() == 1.0
    assert SetCriterion.num_boxes(_targets(2, 3), torch.device("cpu")).item() == 5.0


def test_end_to_end_with_selection_denoising_and_decoder():
    from focus_detr.modeling.decoder import DINODecoder
    from focus_detr.modeling.query_selection import TwoStageQuerySelection

    torch.manual_seed(0)
    hidden = 32
    features = helpers.make_features(((4, 4), (2, 2)), channels=hidden)
    selector = TwoStageQuerySelection(hidden_dim=hidden, num_classes=NUM_CLASSES, num_queries=5)
    denoiser = ContrastiveDenoising(num_classes=NUM_CLASSES, hidden_dim=hidden, dn_number=4)
    decoder = DINODecoder(
        num_layers=2,
        embed_dim=hidden,
        num_heads=4,
        feedforward_dim=64,
        num_levels=2,
        num_points=2,
        num_classes=NUM_CLASSES,
    )
    memory = torch.randn(2, 20, hidden)
    targets = _targets(2, 0)
    selection = selector(memory, features)
    dn = denoiser(targets, selection.queries.shape[1])
    decoded = decoder(
        torch.cat([dn.queries, selection.queries], 1),
        torch.cat([dn.reference_boxes, selection.reference_boxes], 1),
        memory,
        features,
        dn.attn_mask,
        dn.key_padding_mask,
    )
    (logits, boxes), dn_outputs = dn.split_outputs(decoded.class_logits, decoded.boxes)
    outputs = set_outputs(
        logits,
        boxes,
        enc_logits=selection.enc_logits,
        enc_boxes=selection.enc_boxes,
        dn_outputs=dn_outputs,
    )
    losses = _criterion()(outputs, targets, dn)
    assert len(losses) == 3 * 5 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for module in (selector, denoiser, decoder):
        for name, param in module.named_parameters():
            assert param.grad is not None, name
