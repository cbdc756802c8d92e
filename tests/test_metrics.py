"""Split-level metrics: hand-computed values, global (not per-batch) accumulation, conventions."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from covidqu.models.metrics import (
    IMAGE_KEYS,
    SEGMENTATION_KEYS,
    ClassificationMetrics,
    SegmentationMetrics,
    per_image_scores,
)

approx = pytest.approx


def binary_logits(pred: torch.Tensor, scale: float = 5.0) -> torch.Tensor:
    """Logits whose sigmoid > 0.5 exactly where ``pred`` is 1."""
    return scale * (2 * pred.float() - 1)


def multiclass_logits(pred: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return 5.0 * F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


def as_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


# Two 4 x 4 images. A: truth is the top-left 2 x 2 block; the prediction hits 2 of its pixels
# and adds 2 false positives (tp 2, fp 2, fn 2, tn 10). B: empty truth, empty prediction.
TRUTH_A = torch.zeros(1, 1, 4, 4)
TRUTH_A[..., :2, :2] = 1
PRED_A = torch.zeros(1, 1, 4, 4)
PRED_A[..., 0, :2] = 1  # hits (0, 0), (0, 1)
PRED_A[..., 3, 2:] = 1  # false positives (3, 2), (3, 3)
TRUTH_B = torch.zeros(1, 1, 4, 4)
PRED_B = torch.zeros(1, 1, 4, 4)

POOLED_AB = {
    "dice": 4 / 8,
    "iou": 2 / 6,
    "sensitivity": 2 / 4,
    "specificity": 26 / 28,
    "precision": 2 / 4,
    # per-image means: A has dice 4/8, iou 2/6; B, empty truth and prediction, 1 and 1
    "dice_image": (4 / 8 + 1.0) / 2,
    "iou_image": (2 / 6 + 1.0) / 2,
}


# --------------------------------------------------------------------------- binary


def test_binary_hand_computed() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(torch.cat([PRED_A, PRED_B])), torch.cat([TRUTH_A, TRUTH_B]))
    values = as_floats(metric.compute())
    assert set(values) == {*SEGMENTATION_KEYS, *IMAGE_KEYS}
    assert values == approx(POOLED_AB)
    assert metric.tp.dtype == torch.long
    assert metric.tp.tolist() == [2] and metric.fp.tolist() == [2]
    assert metric.fn.tolist() == [2] and metric.tn.tolist() == [26]


def test_accumulation_is_global_not_per_batch() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(PRED_A), TRUTH_A)
    metric.update(binary_logits(PRED_B), TRUTH_B)
    values = as_floats(metric.compute())
    assert values == approx(POOLED_AB)
    # averaging the two batches' Dice would give (0.5 + 1) / 2
    assert values["dice"] != approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_several_updates_equal_one_on_the_concatenation(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    num_classes = 1 if mode == "binary" else 3
    logits = torch.randn(10, num_classes, 8, 8, generator=gen)
    if mode == "binary":
        target = (torch.rand(10, 1, 8, 8, generator=gen) > 0.7).float()
        target[:4] = 0  # some empty images
    else:
        target = torch.randint(0, 3, (10, 8, 8), generator=gen)
    whole = SegmentationMetrics(mode, num_classes)
    whole.update(logits, target)
    parts = SegmentationMetrics(mode, num_classes)
    for lo, hi in [(0, 1), (1, 4), (4, 9), (9, 10)]:
        parts.update(logits[lo:hi], target[lo:hi])
    assert as_floats(parts.compute()) == approx(as_floats(whole.compute()))


def test_forward_returns_batch_values_and_accumulates() -> None:
    metric = SegmentationMetrics()
    first = as_floats(metric(binary_logits(PRED_A), TRUTH_A))
    assert first["dice"] == approx(0.5)
    second = as_floats(metric(binary_logits(PRED_B), TRUTH_B))
    assert second["dice"] == approx(1.0)
    assert as_floats(metric.compute()) == approx(POOLED_AB)


def test_merging_states_sums_counts() -> None:
    """What DDP does: the count states of two processes are summed."""
    a, b = SegmentationMetrics(), SegmentationMetrics()
    a.update(binary_logits(PRED_A), TRUTH_A)
    b.update(binary_logits(PRED_B), TRUTH_B)
    a.merge_state(b)
    assert as_floats(a.compute()) == approx(POOLED_AB)


def test_threshold_is_honoured() -> None:
    target = torch.ones(1, 1, 2, 2)
    logits = torch.full((1, 1, 2, 2), 0.5)  # sigmoid(0.5) = 0.62
    low, high = SegmentationMetrics(threshold=0.5), SegmentationMetrics(threshold=0.7)
    low.update(logits, target)
    high.update(logits, target)
    assert float(low.compute()["sensitivity"]) == approx(1.0)
    assert float(high.compute()["sensitivity"]) == approx(0.0)
    scores = per_image_scores(logits, target, threshold=0.7)
    assert float(scores["pred_fraction"][0]) == 0.0


# A logit of exactly 0 is a probability of exactly 0.5 (the default threshold); the rule is
# sigmoid(logit) > threshold, so such a pixel is background. Four pixels of one image: two at
# logit 0, one just above, one just below.
AT_THRESHOLD = torch.tensor([[[[0.0, 0.0], [1e-3, -1e-3]]]])


def test_probability_exactly_at_the_threshold_is_negative() -> None:
    assert float(torch.sigmoid(AT_THRESHOLD).flatten()[0]) == 0.5
    truth = torch.ones(1, 1, 2, 2)
    metric = SegmentationMetrics(threshold=0.5)
    metric.update(AT_THRESHOLD, truth)
    assert metric.tp.tolist() == [1] and metric.fn.tolist() == [3]
    assert float(metric.compute()["sensitivity"]) == approx(1 / 4)
    # on an empty truth the two pixels at 0.5 are no false positives
    empty = SegmentationMetrics(threshold=0.5)
    empty.update(AT_THRESHOLD, torch.zeros(1, 1, 2, 2))
    assert empty.fp.tolist() == [1] and empty.tn.tolist() == [3]
    scores = per_image_scores(AT_THRESHOLD, truth, threshold=0.5)
    assert float(scores["pred_fraction"][0]) == approx(1 / 4)
    assert float(scores["sensitivity"][0]) == approx(1 / 4)
    assert float(scores["dice"][0]) == approx(2 / 5)


def test_predicted_masks_leave_a_probability_at_the_threshold_out() -> None:
    from covidqu.models.segmentation import SegmentationModule

    module = SegmentationModule(net=torch.nn.Identity(), loss=None, metrics=SegmentationMetrics())
    assert module.threshold == 0.5
    masks = module.predict_masks(AT_THRESHOLD)
    assert masks.shape == (1, 2, 2)
    assert masks.tolist() == [[[0, 0], [1, 0]]]


def test_binary_target_without_channel_dim() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(torch.cat([PRED_A, PRED_B])), torch.cat([TRUTH_A, TRUTH_B])[:, 0])
    assert as_floats(metric.compute()) == approx(POOLED_AB)


# --------------------------------------------------------------------------- empty masks


def test_empty_truth_empty_prediction_is_perfect() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(torch.zeros(2, 1, 4, 4)), torch.zeros(2, 1, 4, 4))
    assert as_floats(metric.compute()) == approx(
        dict.fromkeys((*SEGMENTATION_KEYS, *IMAGE_KEYS), 1.0)
    )


def test_empty_truth_with_false_positives() -> None:
    pred = torch.zeros(1, 1, 4, 4)
    pred[..., 0, 0] = 1
    metric = SegmentationMetrics()
    metric.update(binary_logits(pred), torch.zeros(1, 1, 4, 4))
    values = as_floats(metric.compute())
    assert values["dice"] == 0.0 and values["iou"] == 0.0 and values["precision"] == 0.0
    assert values["sensitivity"] == 1.0  # no positive to miss
    assert values["specificity"] == approx(15 / 16)


def test_missed_lesion_and_all_positive_truth() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(torch.zeros(1, 1, 4, 4)), TRUTH_A)
    values = as_floats(metric.compute())
    assert values["dice"] == 0.0 and values["sensitivity"] == 0.0
    assert values["precision"] == 1.0  # nothing predicted, so nothing predicted wrongly
    full = SegmentationMetrics()
    full.update(binary_logits(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    assert as_floats(full.compute()) == approx(
        dict.fromkeys((*SEGMENTATION_KEYS, *IMAGE_KEYS), 1.0)
    )


def test_per_image_scores_binary_conventions() -> None:
    pred_c = torch.zeros(1, 1, 4, 4)
    pred_c[..., 1, 1] = 1  # C: empty truth, one false positive
    logits = binary_logits(torch.cat([PRED_A, PRED_B, pred_c]))
    target = torch.cat([TRUTH_A, TRUTH_B, torch.zeros(1, 1, 4, 4)])
    scores = per_image_scores(logits, target)
    assert set(scores) == {*SEGMENTATION_KEYS, "pred_fraction", "true_fraction"}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in scores.values())
    assert scores["dice"].tolist() == approx([0.5, 1.0, 0.0])
    assert scores["iou"].tolist() == approx([1 / 3, 1.0, 0.0])
    assert scores["sensitivity"].tolist() == approx([0.5, 1.0, 1.0])
    assert scores["specificity"].tolist() == approx([10 / 12, 1.0, 15 / 16])
    assert scores["precision"].tolist() == approx([0.5, 1.0, 0.0])
    assert scores["pred_fraction"].tolist() == approx([4 / 16, 0.0, 1 / 16])
    assert scores["true_fraction"].tolist() == approx([4 / 16, 0.0, 0.0])


# --------------------------------------------------------------------------- multiclass

# Two 2 x 2 images, classes background (0) / lung (1) / infection (2).
MC_TRUTH = torch.tensor([[[0, 1], [1, 2]], [[0, 0], [1, 1]]])
MC_PRED = torch.tensor([[[0, 1], [2, 2]], [[1, 0], [1, 1]]])
# lung: tp 3, fp 1, fn 1, tn 3; infection: tp 1, fp 1, fn 0, tn 6
MC_EXPECTED = {
    "dice": (6 / 8 + 2 / 3) / 2,
    "iou": (3 / 5 + 1 / 2) / 2,
    "sensitivity": (3 / 4 + 1.0) / 2,
    "specificity": (3 / 4 + 6 / 7) / 2,
    "precision": (3 / 4 + 1 / 2) / 2,
    "dice_lung": 6 / 8,
    "iou_lung": 3 / 5,
    "dice_infection": 2 / 3,
    "iou_infection": 1 / 2,
    # per image, the mean over lung and infection: dice 2/3 and (4/5 + 1)/2, iou 1/2 and
    # (2/3 + 1)/2
    "dice_image": (2 / 3 + (4 / 5 + 1.0) / 2) / 2,
    "iou_image": (1 / 2 + (2 / 3 + 1.0) / 2) / 2,
}


def test_multiclass_hand_computed() -> None:
    metric = SegmentationMetrics("multiclass", num_classes=3)
    metric.update(multiclass_logits(MC_PRED), MC_TRUTH)
    assert as_floats(metric.compute()) == approx(MC_EXPECTED)
    assert metric.tp.tolist() == [2, 3, 1]


def test_multiclass_per_image_and_per_batch_differ() -> None:
    metric = SegmentationMetrics("multiclass", num_classes=3)
    metric.update(multiclass_logits(MC_PRED[:1]), MC_TRUTH[:1])
    metric.update(multiclass_logits(MC_PRED[1:]), MC_TRUTH[1:])
    values = as_floats(metric.compute())
    assert values == approx(MC_EXPECTED)
    per_batch_mean = ((2 / 3 + 2 / 3) / 2 + (4 / 5 + 1.0) / 2) / 2
    assert values["dice"] != approx(per_batch_mean)


def test_multiclass_class_names_and_absent_class() -> None:
    metric = SegmentationMetrics("multiclass", 3, class_names=["bg", "left", "right"])
    truth = torch.tensor([[[0, 1], [1, 0]]])
    metric.update(multiclass_logits(truth), truth)  # class 2 absent and never predicted
    values = as_floats(metric.compute())
    assert {"dice_left", "iou_left", "dice_right", "iou_right"} <= set(values)
    assert values["dice_right"] == 1.0 and values["dice"] == 1.0


def test_per_image_scores_multiclass() -> None:
    scores = per_image_scores(multiclass_logits(MC_PRED), MC_TRUTH, mode="multiclass")
    assert scores["dice_lung"].tolist() == approx([2 / 3, 4 / 5])
    assert scores["dice_infection"].tolist() == approx([2 / 3, 1.0])  # empty vs empty: 1
    assert scores["iou_infection"].tolist() == approx([1 / 2, 1.0])
    assert scores["dice"].tolist() == approx([2 / 3, (4 / 5 + 1.0) / 2])
    assert scores["pred_fraction"].tolist() == approx([3 / 4, 3 / 4])
    assert scores["true_fraction"].tolist() == approx([3 / 4, 2 / 4])
    assert scores["pred_fraction_infection"].tolist() == approx([2 / 4, 0.0])
    assert scores["true_fraction_infection"].tolist() == approx([1 / 4, 0.0])
    same = per_image_scores(multiclass_logits(MC_PRED), MC_TRUTH, mode="multiclass", num_classes=3)
    assert all(torch.equal(same[k], scores[k]) for k in scores)


def test_segmentation_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        SegmentationMetrics("multilabel")
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics("binary", num_classes=3)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetrics("multiclass", 3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        SegmentationMetrics(threshold=1.0)
    metric = SegmentationMetrics()
    with pytest.raises(ValueError, match="mode=multiclass"):
        metric.update(torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    multi = SegmentationMetrics("multiclass", 3)
    with pytest.raises(ValueError, match="int64"):
        multi.update(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        multi.update(torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 3))


def test_segmentation_reset() -> None:
    metric = SegmentationMetrics()
    metric.update(binary_logits(torch.ones(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))
    assert float(metric.compute()["dice"]) == 0.0
    metric.reset()
    assert metric.fp.tolist() == [0]
    metric.update(binary_logits(torch.cat([PRED_A, PRED_B])), torch.cat([TRUTH_A, TRUTH_B]))
    assert as_floats(metric.compute()) == approx(POOLED_AB)


# --------------------------------------------------------------------------- classification

# truth rows, prediction columns: [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
CLS_TRUTH = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
CLS_PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])


def cls_logits(pred: torch.Tensor) -> torch.Tensor:
    return 4.0 * F.one_hot(pred, 3).float()


def test_classification_hand_computed() -> None:
    metric = ClassificationMetrics()
    metric.update(cls_logits(CLS_PRED), CLS_TRUTH)
    values = as_floats(metric.compute())
    keys = {"acc", "f1_macro", "auroc", "sensitivity_covid", "specificity_covid", "ece"}
    assert set(values) == keys
    assert values["acc"] == approx(5 / 8)
    assert values["f1_macro"] == approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert values["sensitivity_covid"] == approx(2 / 3)
    assert values["specificity_covid"] == approx(4 / 5)
    assert 0.0 <= values["auroc"] <= 1.0
    assert metric.confusion_matrix().tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]


def _rank_auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Macro one-vs-rest AUROC as the probability a positive outranks a negative."""
    aucs = []
    for c in range(scores.shape[1]):
        pos, neg = scores[target == c, c], scores[target != c, c]
        aucs.append((pos[:, None] > neg[None, :]).double().mean().item())
    return sum(aucs) / len(aucs)


def test_classification_auroc_matches_rank_definition_and_accumulates() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=gen)
    target = torch.randint(0, 3, (40,), generator=gen)
    metric = ClassificationMetrics()
    for lo in range(0, 40, 7):  # uneven batches
        metric.update(logits[lo : lo + 7], target[lo : lo + 7])
    whole = ClassificationMetrics()
    whole.update(logits, target)
    values = as_floats(metric.compute())
    assert values == approx(as_floats(whole.compute()))
    expected = _rank_auroc(torch.softmax(logits, 1), target)
    assert values["auroc"] == approx(expected, abs=1e-5)
    assert 0.0 <= values["auroc"] <= 1.0


def test_classification_accumulation_is_global() -> None:
    metric = ClassificationMetrics()
    metric.update(cls_logits(CLS_PRED[:2]), CLS_TRUTH[:2])  # 2 of 2 right
    metric.update(cls_logits(CLS_PRED[2:]), CLS_TRUTH[2:])  # 3 of 6 right
    acc = float(metric.compute()["acc"])
    assert acc == approx(5 / 8)
    assert acc != approx((1.0 + 0.5) / 2)


def test_classification_perfect_predictions() -> None:
    target = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    metric = ClassificationMetrics()
    metric.update(cls_logits(target), target)
    confidence = math.exp(4) / (math.exp(4) + 2)  # every sample's top probability
    assert as_floats(metric.compute()) == approx(
        {
            **dict.fromkeys(["acc", "f1_macro", "auroc", "sensitivity_covid"], 1.0),
            "specificity_covid": 1.0,
            "ece": 1.0 - confidence,
        },
        abs=1e-6,  # float32 probabilities
    )


@pytest.mark.filterwarnings("ignore:.*(samples in targets|before the ``update``).*:UserWarning")
def test_classification_forward_reset_and_errors() -> None:
    metric = ClassificationMetrics()
    batch = as_floats(metric(cls_logits(CLS_PRED[:2]), CLS_TRUTH[:2]))
    assert batch["acc"] == 1.0
    metric.update(cls_logits(CLS_PRED[2:]), CLS_TRUTH[2:])
    assert float(metric.compute()["acc"]) == approx(5 / 8)
    metric.reset()
    assert metric.confusion_matrix().sum() == 0
    target = torch.tensor([0, 1, 2])
    metric.update(cls_logits(target), target)
    assert float(metric.compute()["acc"]) == 1.0
    assert metric.confusion_matrix().sum() == 3
    with pytest.raises(ValueError, match="B x 3"):
        metric.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        metric.update(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="positive_class"):
        ClassificationMetrics(positive_class=3)


@pytest.mark.filterwarnings("ignore:No positive samples in targets:UserWarning")
def test_classification_no_covid_sample_convention() -> None:
    target = torch.tensor([1, 2, 1])
    metric = ClassificationMetrics()
    metric.update(cls_logits(torch.tensor([1, 0, 1])), target)
    values = as_floats(metric.compute())
    assert values["sensitivity_covid"] == 1.0  # no COVID-19 case to miss
    assert values["specificity_covid"] == approx(2 / 3)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seg = SegmentationMetrics()
        preds, truths = [PRED_A, PRED_B], [TRUTH_A, TRUTH_B]
        seg.update(binary_logits(preds[rank]), truths[rank])
        cls = ClassificationMetrics()
        half = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven shards
        cls.update(cls_logits(CLS_PRED[half]), CLS_TRUTH[half])
        results[rank] = (as_floats(seg.compute()), as_floats(cls.compute()))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_sums_states_across_processes() -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        seg, cls = results[rank]
        assert seg == approx(POOLED_AB)
        assert cls["acc"] == approx(5 / 8)
        assert cls["sensitivity_covid"] == approx(2 / 3)
        assert cls["specificity_covid"] == approx(4 / 5)


# --------------------------------------------------------------------------- per-image means


def test_per_image_means_and_covid_only_means_by_hand() -> None:
    # three 2 x 2 images: COVID-19 (pred top row, truth top-left), Normal (empty, empty),
    # COVID-19 (pred top-left, truth top row)
    logits = torch.tensor(
        [
            [[[5.0, 5.0], [-5.0, -5.0]]],
            [[[-5.0, -5.0], [-5.0, -5.0]]],
            [[[5.0, -5.0], [-5.0, -5.0]]],
        ]
    )
    truth = torch.tensor(
        [[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]]
    )
    labels = torch.tensor([0, 2, 0])
    metric = SegmentationMetrics("binary", class_names=["infection"], covid_class="infection")
    metric.update(logits[:2], truth[:2], labels[:2])  # batches do not change per-image means
    metric.update(logits[2:], truth[2:], labels[2:])
    values = as_floats(metric.compute())
    assert values["dice"] == approx(4 / 6)  # pooled: tp 2, fp 1, fn 1
    assert values["dice_image"] == approx((2 / 3 + 1.0 + 2 / 3) / 3)
    assert values["iou_image"] == approx((1 / 2 + 1.0 + 1 / 2) / 3)
    assert values["dice_covid"] == approx(2 / 3)  # the Normal image's perfect 1 left out
    assert values["iou_covid"] == approx(1 / 2)
    plain = SegmentationMetrics("binary")
    plain.update(logits, truth)
    assert "dice_covid" not in plain.compute()


def test_covid_means_take_the_covid_class_of_a_multiclass_target() -> None:
    metric = SegmentationMetrics("multiclass", 3, covid_class="infection")
    metric.update(multiclass_logits(MC_PRED), MC_TRUTH, torch.tensor([0, 1]))
    values = as_floats(metric.compute())
    per_image = per_image_scores(multiclass_logits(MC_PRED), MC_TRUTH, mode="multiclass")
    assert values["dice_image"] == approx(per_image["dice"].mean().item())
    assert values["dice_covid"] == approx(per_image["dice_infection"][0].item())
    assert values["iou_covid"] == approx(per_image["iou_infection"][0].item())


def test_covid_means_without_covid_images_or_labels() -> None:
    metric = SegmentationMetrics("binary", class_names=["infection"], covid_class="infection")
    metric.update(torch.full((2, 1, 2, 2), -5.0), torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))
    values = metric.compute()
    assert torch.isnan(values["dice_covid"]) and values["dice_image"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        metric.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="covid_class"):
        SegmentationMetrics("binary", covid_class="infection")  # its only class is "foreground"
