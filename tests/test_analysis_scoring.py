"""Scoring of the two-stage analysis: hand-worked detection, bootstrap, severity and plots."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from covidqu.scoring import detection
from covidqu.scoring.detection import (
    DETECTION_KEYS,
    choose_threshold,
    detection_metrics,
    operating_points,
    weighted_auroc,
)
from covidqu.scoring.plots import plot_grade_confusion, plot_roc, plot_severity
from covidqu.scoring.severity import confusion_counts, severity_metrics

approx = pytest.approx

# Six images, three COVID-19 (scores 2, 6, 9) and three others (0, 1, 5).
SCORES = [0, 1, 2, 5, 6, 9]
TRUTH = [0, 0, 1, 0, 1, 1]

THREE = ("none", "mild", "severe")
# Six images graded on THREE; rows of the confusion matrix (truth) x columns (prediction):
#   none:   1 1 0     mild: 0 2 0     severe: 1 0 1
KAPPA_TRUE = ["none", "none", "mild", "mild", "severe", "severe"]
KAPPA_PRED = ["none", "mild", "mild", "mild", "severe", "none"]


# --- detection: threshold -------------------------------------------------------------------


def test_operating_points_by_hand() -> None:
    # score >= t; tp counts COVID-19 images called, tn others not called.
    #   t    0  1  2  5  6  9  10 (= max + 1: call nothing)
    #   tp   3  3  3  2  2  1  0
    #   tn   0  1  2  2  3  3  3
    thr, tp, tn = operating_points(np.array(SCORES, float), np.array(TRUTH) == 1)
    assert thr.tolist() == [0, 1, 2, 5, 6, 9, 10]
    assert tp.tolist() == [3, 3, 3, 2, 2, 1, 0]
    assert tn.tolist() == [0, 1, 2, 2, 3, 3, 3]


def test_choose_threshold_youden_by_hand() -> None:
    # J = sens + spec from the table above (P = N = 3):
    #   t    0    1    2    5    6    9    10
    #   J    3/3  4/3  5/3  4/3  5/3  4/3  3/3
    # Best 5/3 at t = 2 (sens 1, spec 2/3) and t = 6 (sens 2/3, spec 1): the tie goes to the
    # smallest, 2: call the scores from 2 up. The threshold lies midway between 1, the highest
    # score left uncalled, and 2: 1.5, which makes the same calls.
    assert choose_threshold(SCORES, TRUTH) == 1.5
    m = detection_metrics(SCORES, TRUTH, 2.0, n_boot=10)
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == approx(2 / 3)


def test_choose_threshold_ties_are_exact_not_rounded() -> None:
    # P = 2, N = 6. t = 2: tp 2, tn 2 -> J = 1 + 2/6; t = 6: tp 1, tn 5 -> J = 1/2 + 5/6; both
    # 4/3, but in floating point the second comes out larger (1.3333333333333335). Every other
    # t is worse (e.g. t = 1: 1 + 1/6; t = 5: 1/2 + 4/6). The tie rule must call from 2 up:
    # midway between 1 and 2.
    scores = [0, 1, 2, 3, 4, 5, 6, 7]
    truth = [0, 0, 1, 0, 0, 0, 1, 0]
    assert choose_threshold(scores, truth) == 1.5


def test_choose_threshold_without_information_calls_everything() -> None:
    # Scores ranked the wrong way round (COVID-19 0, 1; other 2): J = 1 + 0 at t = 0 (call
    # all), 1/2 + 0 at t = 1, 0 + 0 at t = 2, 0 + 1 at t = 3 (call nothing). The tie between
    # calling all and calling nothing goes to calling all; likewise when all scores are equal.
    # Below the lowest score there is one neighbour: half the gap to it below (0 - 1/2); a lone
    # score has none, and the threshold lies the fixed margin (1) below it.
    assert choose_threshold([0, 1, 2], [1, 1, 0]) == -0.5
    assert choose_threshold([4, 4, 4], [1, 0, 1]) == 3.0


def test_midway_at_the_ends_and_between_adjacent_floats() -> None:
    assert detection.midway(np.array([1.0, 3.0, 4.0]), 1) == 2.0  # calls 3 and 4
    assert detection.midway(np.array([1.0, 3.0, 4.0]), 3) == 4.5  # calls none: above 4
    assert detection.midway(np.array([7.0]), 1) == 8.0
    # no float lies strictly between these two: the upper one still separates them under >=
    low = 0.1
    high = float(np.nextafter(low, 1.0))
    thr = detection.midway(np.array([low, high]), 1)
    assert detection.called(high, thr) and not detection.called(low, thr)
    with pytest.raises(ValueError, match="midway: index 3"):
        detection.midway(np.array([1.0, 2.0]), 3)


@pytest.mark.parametrize("seed", range(20))
def test_chosen_threshold_lies_midway_and_keeps_the_best_calls(seed: int) -> None:
    # ties between scores (rounded to 1 decimal) and between classes included
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 40)
    truth[:2] = [0, 1]
    scores = np.round(rng.normal(truth * 1.0, 1.0), 1)
    thr = choose_threshold(scores, truth)
    distinct = np.unique(scores)
    assert thr not in distinct  # never on a score
    below, above = distinct[distinct < thr], distinct[distinct > thr]
    if below.size and above.size:  # midway between its two neighbours
        assert thr == approx((below[-1] + above[0]) / 2)
    # the calls are the best ones (Youden's J over every candidate), and the smallest of ties
    cands, tp, tn = operating_points(scores, truth == 1)
    p, n = int(truth.sum()), int((truth == 0).sum())
    best = int(np.argmax(tp * n + tn * p))
    assert np.array_equal(detection.called(scores, thr), scores >= cands[best])
    m = detection_metrics(scores, truth, thr, n_boot=1)
    assert m["sensitivity"] == approx(tp[best] / p)
    assert m["specificity"] == approx(tn[best] / n)


@pytest.mark.parametrize(
    ("truth", "message"),
    [([1, 1, 1], "only COVID-19 images"), ([0, 0, 0], "no COVID-19 image")],
)
def test_choose_threshold_needs_both_classes(truth: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_threshold([1, 2, 3], truth)


# --- detection: figures ---------------------------------------------------------------------


def test_detection_metrics_by_hand() -> None:
    # t = 6: called {6, 9} -> tp 2, fp 0, fn 1 (score 2), tn 3.
    #   sens 2/3, spec 3/3, acc 5/6, f1 = 2tp / (2tp + fp + fn) = 4/5.
    # AUROC: (COVID-19, other) pairs where COVID-19 scores higher: 2 beats 0, 1 (not 5);
    # 6 and 9 beat all three -> 8 of 9.
    m = detection_metrics(SCORES, TRUTH, 6.0, n_boot=50)
    assert m["sensitivity"] == approx(2 / 3)
    assert m["specificity"] == 1.0
    assert m["accuracy"] == approx(5 / 6)
    assert m["f1"] == approx(4 / 5)
    assert m["auroc"] == approx(8 / 9)
    assert set(m) == {f"{k}{s}" for k in DETECTION_KEYS for s in ("", "_ci_low", "_ci_high")}
    assert all(type(v) is float for v in m.values())


def test_auroc_counts_ties_as_half() -> None:
    # COVID-19 {2, 3} against others {1, 2}: 2 vs 1 wins, 2 vs 2 ties (1/2), 3 beats both
    # -> 3.5 / 4.
    m = detection_metrics([1, 2, 2, 3], [0, 0, 1, 1], 2.0, n_boot=10)
    assert m["auroc"] == approx(0.875)


def test_weighted_auroc_matches_torchmetrics_on_repeated_images() -> None:
    # The bootstrap's AUROC counts image i weights[r, i] times; it must equal the AUROC of the
    # images actually repeated that often. Scores lie in [0, 1] (torchmetrics would take
    # others for logits) and hold ties.
    rng = np.random.default_rng(3)
    n = 40
    scores = rng.integers(0, 8, n) / 8.0
    truth = rng.integers(0, 2, n) == 1
    weights = rng.integers(0, 4, size=(5, n)).astype(float)
    got = weighted_auroc(weights, scores, truth)
    for r in range(5):
        reps = weights[r].astype(int)
        s = torch.from_numpy(np.repeat(scores, reps))
        t = torch.from_numpy(np.repeat(truth, reps).astype(np.int64))
        assert got[r] == approx(float(binary_auroc(s, t)), abs=1e-6)


def test_zero_denominators_follow_the_project_rule() -> None:
    # No COVID-19 image, none called: sensitivity (0/0) and F1 (0/0) are 1; AUROC undefined.
    m = detection_metrics([1, 2, 3], [0, 0, 0], 10.0, n_boot=20)
    assert m["sensitivity"] == 1.0
    assert m["f1"] == 1.0
    assert m["specificity"] == 1.0
    assert math.isnan(m["auroc"])
    assert math.isnan(m["auroc_ci_low"]) and math.isnan(m["auroc_ci_high"])
    # No other image: specificity (0/0) is 1.
    m = detection_metrics([1, 2, 3], [1, 1, 1], 2.0, n_boot=20)
    assert m["specificity"] == 1.0
    assert m["sensitivity"] == approx(2 / 3)


# --- detection: bootstrap -------------------------------------------------------------------


def _mixed(n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    return rng.normal(size=n) + 1.5 * truth, truth


def test_bootstrap_intervals_hold_the_value_and_have_width() -> None:
    scores, truth = _mixed()
    m = detection_metrics(scores, truth, 0.75, n_boot=500, seed=0)
    for k in DETECTION_KEYS:
        assert m[f"{k}_ci_low"] < m[k] < m[f"{k}_ci_high"], k


def test_bootstrap_interval_width_matches_a_proportion() -> None:
    # 400 images resampled with replacement: accuracy's 95% interval spans about
    # 2 * 1.96 * sqrt(acc (1 - acc) / 400) (the normal approximation of a proportion).
    scores, truth = _mixed()
    m = detection_metrics(scores, truth, 0.75, n_boot=2000, seed=0)
    acc = m["accuracy"]
    expected = 2 * 1.96 * math.sqrt(acc * (1 - acc) / 400)
    assert m["accuracy_ci_high"] - m["accuracy_ci_low"] == approx(expected, rel=0.1)


def test_bootstrap_is_deterministic_with_the_seed() -> None:
    scores, truth = _mixed(n=60)
    a = detection_metrics(scores, truth, 0.75, n_boot=200, seed=7)
    b = detection_metrics(scores, truth, 0.75, n_boot=200, seed=7)
    c = detection_metrics(scores, truth, 0.75, n_boot=200, seed=8)
    assert a == b
    assert a != c


def test_bootstrap_does_not_depend_on_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # Resamples are drawn in blocks to bound memory; the blocks must not change the draws.
    scores, truth = _mixed(n=60)
    whole = detection_metrics(scores, truth, 0.75, n_boot=200, seed=3)
    monkeypatch.setattr(detection, "_BOOT_CHUNK", 7 * 60)
    assert detection_metrics(scores, truth, 0.75, n_boot=200, seed=3) == whole


def test_bootstrap_is_degenerate_when_every_image_is_right() -> None:
    # Every image is called right and every COVID-19 image outscores every other one, so every
    # resample scores 1 on each figure: resamples without COVID-19 images (or without others)
    # by the zero-denominator rule, and AUROC leaves out the resamples that hold one class.
    m = detection_metrics([1, 2, 7, 8, 9], [0, 0, 1, 1, 1], 5.0, n_boot=300, seed=0)
    for k in DETECTION_KEYS:
        assert m[k] == m[f"{k}_ci_low"] == m[f"{k}_ci_high"] == 1.0, k


# --- detection: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [1, 2], "truth": [0, 1, 1]}, "differ in length"),
        ({"truth": [0, 2, 1, 0, 1, 1]}, r"truth must be 1 \(COVID-19\) or 0"),
        ({"scores": [0, 1, float("nan"), 5, 6, 9]}, "non-finite.*position 2"),
        ({"scores": [], "truth": []}, "scores is empty"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"n_boot": 0}, "n_boot must be"),
        ({"ci": 95}, "ci is the interval's coverage"),
    ],
)
def test_detection_errors_name_the_problem(kwargs: dict, message: str) -> None:
    args = {"scores": SCORES, "truth": TRUTH, "threshold": 2.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        detection_metrics(**args)


def test_choose_threshold_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"choose_threshold: scores and truth differ in length"):
        choose_threshold([1, 2, 3], [0, 1])


# --- severity -------------------------------------------------------------------------------


def test_severity_metrics_by_hand() -> None:
    # |10-12| + |20-20| + |30-25| = 7 over 3 images.
    # Pearson of true [1, 2, 3] and predicted [1, 3, 2]: deviations (-1, 0, 1) and (-1, 1, 0),
    # products sum to 1, sums of squares 2 and 2 -> 1 / 2.
    m = severity_metrics([10, 20, 30], [12, 20, 25], ["none"] * 3, ["none"] * 3, THREE)
    assert m["mae_pct"] == approx(7 / 3)
    assert severity_metrics([1, 3, 2], [1, 2, 3], ["none"] * 3, ["none"] * 3, THREE)[
        "pearson"
    ] == approx(0.5)
    assert all(type(v) is float for v in m.values())


def test_pearson_of_linear_and_constant() -> None:
    true = [0.0, 12.5, 30.0, 61.0]
    g = ["none"] * 4
    assert severity_metrics([2 * x + 3 for x in true], true, g, g, THREE)["pearson"] == approx(1)
    assert severity_metrics([50 - x for x in true], true, g, g, THREE)["pearson"] == approx(-1)
    # 0.1 three times averages to 0.10000000000000002: constant all the same.
    assert math.isnan(severity_metrics([0.1] * 3, [1, 2, 3], g[:3], g[:3], THREE)["pearson"])
    assert math.isnan(severity_metrics([1, 2, 3], [7] * 3, g[:3], g[:3], THREE)["pearson"])


def test_pearson_by_hand_is_not_spearman() -> None:
    """Pearson's r of the values themselves, not of their ranks: shares where the two differ.

    True [0, 10, 20, 70] (mean 25) and predicted [10, 20, 60, 30] (mean 30): deviations
    (-25, -15, -5, 45) and (-20, -10, 30, 0); products sum to 500 + 150 - 150 + 0 = 500, sums
    of squares 2900 and 1400, so r = 500 / sqrt(2900 * 1400) = 5 / sqrt(406) ~ 0.248. Their
    ranks (1, 2, 3, 4) and (1, 2, 4, 3) would give Spearman's 0.8.
    """
    true, pred = [0.0, 10.0, 20.0, 70.0], [10.0, 20.0, 60.0, 30.0]
    g = ["none"] * 4
    r = severity_metrics(pred, true, g, g, THREE)["pearson"]
    assert r == approx(5 / math.sqrt(406), rel=1e-12)
    assert r == approx(float(np.corrcoef(pred, true)[0, 1]), rel=1e-12)
    ranks = [np.argsort(np.argsort(v)).astype(float) for v in (pred, true)]
    assert float(np.corrcoef(*ranks)[0, 1]) == approx(0.8)  # Spearman: far from r


def test_grade_kappa_quadratic_by_hand() -> None:
    # Grades none < mild < severe = 0, 1, 2; quadratic disagreement (i - j)^2 (its scale
    # cancels). Pairs (true, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0).
    # Observed disagreement: 0 + 1 + 0 + 0 + 0 + 4 = 5 (per image 5/6).
    # Marginals: true (2, 2, 2), pred (2, 3, 1). Expected disagreement per image:
    #   sum_ij t_i p_j (i - j)^2 / 6^2 = 2/36 * [p.(0,1,4) + p.(1,0,1) + p.(4,1,0)]
    #   = 2/36 * (7 + 3 + 11) = 42/36 = 7/6.
    # kappa = 1 - (5/6) / (7/6) = 2/7. (Unweighted it would be 1/2, linear weights 2/5.)
    m = severity_metrics([0] * 6, [0] * 6, KAPPA_PRED, KAPPA_TRUE, THREE)
    assert m["grade_kappa"] == approx(2 / 7, rel=1e-6)
    assert m["grade_acc"] == approx(4 / 6)


def test_grade_kappa_constant_grades() -> None:
    same = severity_metrics([1, 2], [1, 2], ["mild", "mild"], ["mild", "mild"], THREE)
    assert same["grade_kappa"] == 1.0
    assert same["grade_acc"] == 1.0
    other = severity_metrics([1, 2], [1, 2], ["mild", "mild"], ["none", "none"], THREE)
    assert other["grade_kappa"] == approx(0.0, abs=1e-7)
    assert other["grade_acc"] == 0.0


def test_grade_confusion_rows_are_truth() -> None:
    pred = np.array([THREE.index(g) for g in KAPPA_PRED])
    true = np.array([THREE.index(g) for g in KAPPA_TRUE])
    assert confusion_counts(pred, true, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pred_grade": ["none", "bad", "mild"]}, r"pred_grade holds grades \['bad'\]"),
        ({"true_pct": [1, 2]}, "differ in length"),
        ({"grades": ("none", "mild", "none")}, "grades repeats a name"),
        ({"pred_pct": [1, float("inf"), 2]}, "pred_pct holds 1 non-finite"),
    ],
)
def test_severity_errors_name_the_problem(kwargs: dict, message: str) -> None:
    args = {
        "pred_pct": [1, 2, 3],
        "true_pct": [1, 2, 3],
        "pred_grade": ["none", "mild", "mild"],
        "true_grade": ["none", "mild", "severe"],
        "grades": THREE,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        severity_metrics(**args)


# --- plots ----------------------------------------------------------------------------------


def _check_png(path, returned) -> None:
    assert returned == path
    assert path.stat().st_size > 0
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    h, w = image.shape[:2]
    assert 300 <= h <= 2000 and 300 <= w <= 2000
    assert image.std() > 10  # something drawn on the white background


def test_plots_write_pngs(tmp_path) -> None:
    scores, truth = _mixed(n=80)
    pct = np.clip(scores * 20 + 30, 0, 100)
    path = tmp_path / "nested" / "roc.png"
    _check_png(path, plot_roc(scores, truth, 0.75, path))
    path = tmp_path / "severity.png"
    _check_png(path, plot_severity(pct, np.clip(pct + 5 * scores, 0, 100), path))
    path = tmp_path / "grades.png"
    _check_png(path, plot_grade_confusion(KAPPA_PRED, KAPPA_TRUE, THREE, path))


def test_plot_roc_needs_both_classes(tmp_path) -> None:
    with pytest.raises(ValueError, match="one class only"):
        plot_roc([1, 2], [1, 1], 1.5, tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()
