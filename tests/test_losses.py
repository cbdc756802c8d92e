"""Losses: every conf/loss config builds and trains on empty, full and random masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from covidqu.models.losses import (
    BCELoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    LovaszLoss,
    TverskyLoss,
    WeightedSum,
)

LOSS_DIR = Path(__file__).resolve().parents[1] / "conf" / "loss"

#: Which configs serve which task; every file in conf/loss must be listed in one of them.
BINARY_SEG = ["dice", "bce", "dice_bce", "focal", "tversky", "lovasz", "jaccard", "combo"]
#: Binary cross-entropy has no multi-class meaning: these refuse a multi-class target.
BINARY_ONLY = ["bce", "dice_bce"]
MULTICLASS_SEG = [n for n in BINARY_SEG if n not in BINARY_ONLY] + ["ce", "ce_smooth", "dice_ce"]
CLASSIFICATION = ["ce", "ce_smooth", "focal"]
MULTICLASS_ONLY = ["ce", "ce_smooth", "dice_ce"]

B, H, W, C = 3, 16, 16, 3


def build(name: str, mode: str, **overrides: object):
    """Instantiate conf/loss/<name>.yaml the way the composed run config would."""
    cfg = OmegaConf.merge(
        {"task": {"mode": mode}},
        {"loss": OmegaConf.load(LOSS_DIR / f"{name}.yaml")},
        {"loss": overrides},
    )
    return instantiate(cfg.loss)


def build_error(name: str, mode: str, **overrides: object) -> ValueError:
    """The ValueError a config raises when built (Hydra wraps it; the cause is kept)."""
    with pytest.raises(InstantiationException) as info:
        build(name, mode, **overrides)
    assert isinstance(info.value.__cause__, ValueError), info.value
    return info.value.__cause__


def seg_target(mode: str, kind: str, seed: int = 0) -> torch.Tensor:
    """A batch target: every image empty, every image full, or random (all classes present)."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "binary":
        if kind == "empty":
            return torch.zeros(B, 1, H, W)
        if kind == "full":
            return torch.ones(B, 1, H, W)
        return (torch.rand(B, 1, H, W, generator=gen) > 0.5).float()
    if kind == "empty":  # background only: no lung, no infection
        return torch.zeros(B, H, W, dtype=torch.long)
    if kind == "full":  # infection everywhere
        return torch.full((B, H, W), 2, dtype=torch.long)
    return torch.randint(0, C, (B, H, W), generator=gen)


def random_logits(mode: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    channels = 1 if mode == "binary" else C
    return torch.randn(B, channels, H, W, generator=gen).requires_grad_(True)


def perfect_logits(mode: str, target: torch.Tensor, scale: float = 12.0) -> torch.Tensor:
    if mode == "binary":
        return scale * (2 * target - 1)
    return scale * (2 * F.one_hot(target, C).permute(0, 3, 1, 2).float() - 1)


def wrong_logits(mode: str, target: torch.Tensor, scale: float = 12.0) -> torch.Tensor:
    if mode == "binary":
        return -perfect_logits(mode, target, scale)
    return perfect_logits(mode, (target + 1) % C, scale)


def test_every_config_is_covered() -> None:
    names = {p.stem for p in LOSS_DIR.glob("*.yaml")}
    assert names == set(BINARY_SEG) | set(MULTICLASS_SEG) | set(CLASSIFICATION)


@pytest.mark.parametrize("kind", ["empty", "full", "random"])
@pytest.mark.parametrize(
    ("name", "mode"),
    [(n, "binary") for n in BINARY_SEG] + [(n, "multiclass") for n in MULTICLASS_SEG],
)
def test_config_finite_with_gradient(name: str, mode: str, kind: str) -> None:
    loss_fn = build(name, mode)
    logits = random_logits(mode)
    loss = loss_fn(logits, seg_target(mode, kind))
    assert loss.dim() == 0
    assert torch.isfinite(loss), f"{name}/{mode}/{kind} gave {loss}"
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["empty", "random"])
@pytest.mark.parametrize(
    ("name", "mode"),
    [(n, "binary") for n in BINARY_SEG] + [(n, "multiclass") for n in MULTICLASS_SEG],
)
def test_perfect_prediction_beats_wrong(name: str, mode: str, kind: str) -> None:
    loss_fn = build(name, mode)
    target = seg_target(mode, kind)
    good = loss_fn(perfect_logits(mode, target), target)
    bad = loss_fn(wrong_logits(mode, target), target)
    assert torch.isfinite(good) and torch.isfinite(bad)
    assert good < bad
    if name != "ce_smooth":  # label smoothing keeps a floor above 0
        assert good < 0.05


def test_mixed_batch_with_one_empty_image_is_finite() -> None:
    target = seg_target("binary", "random")
    target[0] = 0
    for name in BINARY_SEG:
        logits = random_logits("binary")
        loss = build(name, "binary")(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), name


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_losses(name: str) -> None:
    loss_fn = build(name, "multiclass")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, C, generator=gen).requires_grad_(True)
    target = torch.randint(0, C, (8,), generator=gen)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    onehot = F.one_hot(target, C).float()
    assert loss_fn(10 * onehot, target) < loss_fn(-10 * onehot, target)


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky", "lovasz", "dice_ce", "combo"])
def test_segmentation_losses_reject_classification_logits(name: str) -> None:
    loss_fn = build(name, "multiclass")
    with pytest.raises(ValueError, match="classif"):
        loss_fn(torch.randn(4, C), torch.randint(0, C, (4,)))


def test_dice_empty_mask_convention() -> None:
    empty = torch.zeros(2, 1, 8, 8)
    dice = DiceLoss("binary")
    # empty truth, nothing predicted: a correct "no infection", loss about 0
    assert dice(torch.full_like(empty, -20.0), empty) < 1e-6
    # empty truth, foreground predicted: penalised, not ignored
    assert dice(torch.full_like(empty, 5.0), empty) > 0.9
    # without smoothing and with eps the value stays finite
    assert torch.isfinite(DiceLoss("binary", smooth=0.0)(torch.full_like(empty, -20.0), empty))


def test_tversky_weights_false_negatives_by_beta() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    missed = torch.full_like(target, -10.0)  # every positive missed: only false negatives
    fn_heavy = TverskyLoss("binary", alpha=0.1, beta=0.9, smooth=0.0)
    fp_heavy = TverskyLoss("binary", alpha=0.9, beta=0.1, smooth=0.0)
    over = torch.full_like(target, 10.0)  # everything predicted: only false positives
    assert fn_heavy(missed, target) > fp_heavy(missed, target)
    assert fp_heavy(over, target) > fn_heavy(over, target)


def test_jaccard_matches_hand_value() -> None:
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    logits = torch.tensor([[[[30.0, -30.0], [30.0, -30.0]]]])  # tp 1, fp 1, fn 1
    assert JaccardLoss("binary", smooth=0.0)(logits, target).item() == pytest.approx(2 / 3)
    assert DiceLoss("binary", smooth=0.0)(logits, target).item() == pytest.approx(0.5)


# Two different 2 x 2 images in one batch, with probabilities of 3/4 or 1/4 (logits +-ln 3).
# Image 1: truth top row, prediction left column; image 2: truth and prediction everywhere.
TWO_TRUTH = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
TWO_LOGITS = math.log(3.0) * torch.tensor(
    [[[[1.0, -1.0], [1.0, -1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]]
)
# Soft counts pooled over both images: image 1 has tp 1, fp 1, fn 1; image 2 tp 3, fp 0, fn 1.
POOLED_SOFT_DICE = 1 - 2 * 4 / (2 * 4 + 1 + 2)  # 3/11; per-image Dice averaged would be 9/28
# BCE: 2 wrong pixels at p = 1/4 and 6 right ones at p = 3/4, averaged over the 8 pixels.
TWO_BCE = (2 * math.log(4) + 6 * math.log(4 / 3)) / 8


def test_binary_losses_of_a_two_image_batch_by_hand() -> None:
    """Dice pools its soft counts over the batch; BCE averages over every pixel of it."""
    dice = DiceLoss("binary", smooth=0.0)(TWO_LOGITS, TWO_TRUTH)
    assert dice.item() == pytest.approx(POOLED_SOFT_DICE, abs=1e-6)
    assert build("dice", "binary", smooth=0.0)(TWO_LOGITS, TWO_TRUTH).item() == pytest.approx(
        POOLED_SOFT_DICE, abs=1e-6
    )
    assert build("bce", "binary")(TWO_LOGITS, TWO_TRUTH).item() == pytest.approx(TWO_BCE, abs=1e-6)
    dice_bce = build("dice_bce", "binary", losses={"dice": {"smooth": 0.0}})
    assert dice_bce(TWO_LOGITS, TWO_TRUTH).item() == pytest.approx(
        POOLED_SOFT_DICE + TWO_BCE, abs=1e-6
    )
    # each image alone: the batch figure is no mean of these
    alone = [
        DiceLoss("binary", smooth=0.0)(TWO_LOGITS[i : i + 1], TWO_TRUTH[i : i + 1]) for i in (0, 1)
    ]
    assert [v.item() for v in alone] == pytest.approx([1 / 2, 1 / 7], abs=1e-6)


def test_multiclass_losses_of_a_two_image_batch_by_hand() -> None:
    """Soft Dice per class pooled over the batch, then averaged over the classes; CE per pixel.

    Each pixel's predicted class has probability 1/2, the two others 1/4 (logit ln 2 vs 0).
    Pixels (truth, prediction): image 1 (0,0) (1,1) (1,2) (2,2); image 2 (0,1) (0,0) (1,1) (1,1).
    """
    truth = torch.tensor([[[0, 1], [1, 2]], [[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [2, 2]], [[1, 0], [1, 1]]])
    logits = math.log(2.0) * F.one_hot(pred, C).permute(0, 3, 1, 2).float()
    # pooled soft counts: class 0 tp 5/4 fp 5/4 fn 7/4; class 1 tp 7/4 fp 5/4 fn 9/4;
    # class 2 tp 1/2 fp 2 fn 1/2
    dice_per_class = [2.5 / 5.5, 3.5 / 7.0, 1.0 / 3.5]  # 5/11, 1/2, 2/7
    dice = 1 - sum(dice_per_class[1:]) / 2  # the foreground classes, as the metrics
    dice_all = 1 - sum(dice_per_class) / 3  # with include_background
    ce = (6 * math.log(2) + 2 * math.log(4)) / 8  # 6 right pixels at 1/2, 2 wrong at 1/4
    assert DiceLoss("multiclass", smooth=0.0)(logits, truth).item() == pytest.approx(dice, abs=1e-6)
    everything = DiceLoss("multiclass", smooth=0.0, include_background=True)
    assert everything(logits, truth).item() == pytest.approx(dice_all, abs=1e-6)
    assert build("ce", "multiclass")(logits, truth).item() == pytest.approx(ce, abs=1e-6)
    dice_ce = build("dice_ce", "multiclass", losses={"dice": {"smooth": 0.0}})
    assert dice_ce(logits, truth).item() == pytest.approx(dice + ce, abs=1e-6)
    assert dice_ce.last["dice"].item() == pytest.approx(dice, abs=1e-6)


def test_dice_classes_selects_channels() -> None:
    target = seg_target("multiclass", "random")
    logits = random_logits("multiclass")
    full = DiceLoss("multiclass", classes=None, include_background=True)(logits, target)
    fg = DiceLoss("multiclass", classes=[1, 2])(logits, target)
    assert not torch.isclose(full, fg)
    with pytest.raises(ValueError, match=r"loss\.classes"):
        DiceLoss("binary", classes=[0])
    with pytest.raises(ValueError, match=r"loss\.classes"):
        DiceLoss("multiclass", classes=[5])(logits, target)


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky"])
def test_multiclass_overlap_losses_leave_the_background_out_like_the_metrics(name: str) -> None:
    target = seg_target("multiclass", "random")
    logits = random_logits("multiclass")
    loss_fn = build(name, "multiclass")  # the config, as a run builds it
    foreground = build(name, "multiclass", classes=[1, 2])(logits, target)
    everything = build(name, "multiclass", include_background=True)(logits, target)
    assert torch.isclose(loss_fn(logits, target), foreground)
    assert not torch.isclose(foreground, everything)


def test_dice_loss_is_one_minus_the_metric_dice_on_hard_multiclass_predictions() -> None:
    from covidqu.models.metrics import SegmentationMetrics

    target = seg_target("multiclass", "random")
    guess = torch.where(torch.rand(B, H, W) < 0.3, (target + 1) % C, target)  # 30 % wrong
    logits = perfect_logits("multiclass", guess, scale=40.0)
    metric = SegmentationMetrics("multiclass", num_classes=C)
    metric.update(logits, target)
    expected = 1.0 - float(metric.compute()["dice"])
    alone = build("dice", "multiclass", smooth=0.0)
    part = build("dice_ce", "multiclass", losses={"dice": {"smooth": 0.0}}).losses["dice"]
    for loss_fn in (alone, part):
        assert float(loss_fn(logits, target)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", BINARY_ONLY)
def test_binary_cross_entropy_refuses_a_multiclass_target(name: str) -> None:
    message = str(build_error(name, "multiclass"))
    assert "loss=ce" in message and "loss=dice_ce" in message


def test_lovasz_per_image_on_empty_images() -> None:
    logits = random_logits("binary")
    loss = LovaszLoss("binary", per_image=True)(logits, seg_target("binary", "empty"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    mlogits = random_logits("multiclass")
    mloss = LovaszLoss("multiclass", per_image=True)(mlogits, seg_target("multiclass", "empty"))
    assert torch.isfinite(mloss)


# --------------------------------------------------------------------------- WeightedSum


def test_weighted_sum_arithmetic_and_components() -> None:
    dice, bce = DiceLoss("binary"), BCELoss("binary")
    combo = WeightedSum({"dice": dice, "bce": bce}, {"dice": 0.7, "bce": 0.3})
    logits, target = random_logits("binary"), seg_target("binary", "random")
    total = combo(logits, target)
    expected = 0.7 * dice(logits, target) + 0.3 * bce(logits, target)
    assert torch.allclose(total, expected)
    assert set(combo.last) == {"dice", "bce"}
    assert torch.allclose(combo.last["dice"], dice(logits, target))
    assert torch.allclose(combo.last["bce"], bce(logits, target))
    assert not combo.last["dice"].requires_grad
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_sum_default_and_zero_weights() -> None:
    dice, bce = DiceLoss("binary"), BCELoss("binary")
    logits, target = random_logits("binary"), seg_target("binary", "random")
    equal = WeightedSum({"dice": dice, "bce": bce})
    assert equal.weights == {"dice": 1.0, "bce": 1.0}
    assert torch.allclose(equal(logits, target), dice(logits, target) + bce(logits, target))
    partial = WeightedSum({"dice": dice, "bce": bce}, {"bce": 0})
    assert torch.allclose(partial(logits, target), dice(logits, target))
    assert "bce" in partial.last  # still logged


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"dcie": 1.0}, r"loss\.weights.*dcie"),
        ({"dice": -1.0}, r"loss\.weights\.dice"),
        ({"dice": 0.0, "bce": 0.0}, r"loss\.weights.*zero"),
        ({"dice": "heavy"}, r"loss\.weights\.dice"),
        ({"dice": float("nan")}, r"loss\.weights\.dice"),
    ],
)
def test_weighted_sum_rejects_bad_weights(weights: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WeightedSum({"dice": DiceLoss("binary"), "bce": BCELoss("binary")}, weights)


def test_weighted_sum_rejects_empty_or_non_modules() -> None:
    with pytest.raises(ValueError, match=r"loss\.losses"):
        WeightedSum({})
    with pytest.raises(TypeError, match=r"loss\.losses\.dice"):
        WeightedSum({"dice": "DiceLoss"})


def test_combo_weights_override_from_config() -> None:
    combo = build("combo", "binary", weights={"dice": 0.7})
    assert isinstance(combo, WeightedSum)
    assert combo.weights == {"dice": 0.7, "focal": 1.0}
    logits, target = random_logits("binary"), seg_target("binary", "random")
    total = combo(logits, target)
    assert torch.allclose(total, 0.7 * combo.last["dice"] + combo.last["focal"])


def test_combo_weights_override_from_command_line() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(LOSS_DIR.parent), version_base="1.3"):
        cfg = compose(overrides=["+loss=combo", "+task.mode=multiclass", "loss.weights.dice=0.25"])
    combo = instantiate(cfg.loss)
    assert combo.weights == {"dice": 0.25, "focal": 1.0}
    assert combo.losses["focal"].mode == "multiclass"


# --------------------------------------------------------------------------- validation


def test_bad_mode_names_the_key() -> None:
    for cls in (DiceLoss, JaccardLoss, TverskyLoss, LovaszLoss, FocalLoss, BCELoss):
        with pytest.raises(ValueError, match=r"loss\.mode"):
            cls(mode="multilabel")
    assert "loss.mode" in str(build_error("dice", "segmentation"))


def test_ce_rejects_binary_mode() -> None:
    assert "loss.mode=multiclass" in str(build_error("ce", "binary"))
    assert "loss.mode=multiclass" in str(build_error("dice_ce", "binary"))


def test_binary_loss_on_multichannel_logits_says_what_to_fix() -> None:
    target = seg_target("multiclass", "random")
    for name in BINARY_SEG:
        with pytest.raises(ValueError, match=r"data\.target"):
            build(name, "binary")(random_logits("multiclass"), target)


def test_multiclass_loss_on_binary_data_says_what_to_fix() -> None:
    with pytest.raises(ValueError, match=r"loss\.mode=binary"):
        DiceLoss("multiclass")(random_logits("binary"), seg_target("binary", "random"))
    with pytest.raises(ValueError, match="int64"):
        DiceLoss("multiclass")(random_logits("multiclass"), torch.zeros(B, H, W))


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        DiceLoss("binary")(random_logits("binary"), torch.zeros(B, 1, H, W + 1))
    with pytest.raises(ValueError, match="B x H x W"):
        CrossEntropyLoss()(random_logits("multiclass"), torch.zeros(B, H + 1, W).long())
    with pytest.raises(ValueError, match="logits must be"):
        DiceLoss("binary")(torch.randn(B, 1, H), torch.zeros(B, 1, H))
    with pytest.raises(ValueError, match="classification target"):
        CrossEntropyLoss()(torch.randn(4, C), torch.zeros(4, 1).long())


def test_binary_target_may_omit_channel_dim() -> None:
    logits, target = random_logits("binary"), seg_target("binary", "random")
    dice = DiceLoss("binary")
    assert torch.allclose(dice(logits, target), dice(logits, target[:, 0]))


# --------------------------------------------------------------------------- options


def test_label_smoothing_changes_value() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, C, generator=gen)
    target = torch.randint(0, C, (8,), generator=gen)
    plain = build("ce", "multiclass")(logits, target)
    smooth = build("ce_smooth", "multiclass")(logits, target)
    assert build("ce_smooth", "multiclass").label_smoothing == pytest.approx(0.1)
    assert not torch.isclose(plain, smooth)
    assert torch.isclose(plain, F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.0)


def test_class_weights_change_value() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(16, C, generator=gen)
    target = torch.randint(0, C, (16,), generator=gen)
    plain = build("ce", "multiclass")(logits, target)
    weighted = build("ce", "multiclass", class_weights=[1.0, 5.0, 1.0])(logits, target)
    assert not torch.isclose(plain, weighted)
    expected = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 5.0, 1.0]))
    assert torch.isclose(weighted, expected)
    with pytest.raises(ValueError, match=r"loss\.class_weights"):
        build("ce", "multiclass", class_weights=[1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match=r"loss\.class_weights"):
        CrossEntropyLoss(class_weights=[1.0, -1.0, 1.0])


def test_focal_alpha_and_gamma() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(16, C, generator=gen)
    target = torch.randint(0, C, (16,), generator=gen)
    assert torch.isclose(
        FocalLoss("multiclass", gamma=0.0)(logits, target), F.cross_entropy(logits, target)
    )
    plain = build("focal", "multiclass")(logits, target)
    weighted = build("focal", "multiclass", alpha=[2.0, 1.0, 1.0])(logits, target)
    assert not torch.isclose(plain, weighted)
    assert plain < F.cross_entropy(logits, target)  # easy samples down-weighted
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        FocalLoss("multiclass", alpha=0.25)
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        FocalLoss("binary", alpha=[0.25, 0.75])
    seg_logits, seg = random_logits("binary"), seg_target("binary", "random")
    assert not torch.isclose(
        FocalLoss("binary", alpha=0.9)(seg_logits, seg), FocalLoss("binary")(seg_logits, seg)
    )


def test_bce_pos_weight_and_no_multiclass() -> None:
    logits, target = random_logits("binary"), seg_target("binary", "random")
    plain = build("bce", "binary")(logits, target)
    assert torch.isclose(plain, F.binary_cross_entropy_with_logits(logits, target))
    assert not torch.isclose(build("bce", "binary", pos_weight=5.0)(logits, target), plain)
    # a multi-class target is refused, not quietly trained with cross-entropy as "loss_bce"
    assert "loss=ce" in str(build_error("bce", "multiclass"))
    assert "loss.pos_weight" in str(build_error("bce", "multiclass", pos_weight=2.0))


def test_losses_follow_module_device_and_dtype() -> None:
    loss_fn = build("ce", "multiclass", class_weights=[1.0, 2.0, 3.0]).to(torch.float64)
    logits = torch.randn(4, C, dtype=torch.float64)
    assert torch.isfinite(loss_fn(logits, torch.tensor([0, 1, 2, 0])))
    assert "class_weights" not in loss_fn.state_dict()  # configs may change between runs
