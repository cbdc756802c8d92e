"""Score COVID-19 detection against the truth.

Detection calls an image COVID-19 when its ``covid_score`` (:func:`detection_score`: the
infected share of the lung in percent, or a classifier's probability) is at or above a
threshold: ``score >= threshold``, everywhere in this module. :func:`choose_threshold` picks
that threshold on one split (never the split it is scored on); :func:`detection_metrics` scores
it with percentile-bootstrap intervals over images, so that a difference between two models can
be told from the luck of which images the split holds.

Zero denominators follow the project's rule (see :mod:`covidqu.models.metrics`): a ratio whose
denominator is zero is 1, because there was nothing it measures and so nothing got wrong. So
sensitivity is 1 on images that hold no COVID-19 case, specificity is 1 on images that hold no
other case, and F1 is 1 when there is no COVID-19 case and none is called. AUROC has no such
reading: it is NaN when the images hold one class only.

AUROC is computed here, not with torchmetrics' ``binary_auroc``: that one takes scores outside
[0, 1] for logits and passes them through a sigmoid, which rounds every percentage above about
37 to exactly 1.0 and so turns distinct scores into ties; and the bootstrap needs it over a
thousand resamples at once, as weighted counts (see :func:`weighted_auroc`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from covidqu.scoring.inputs import binary_inputs, check_threshold

#: The detection figures; :func:`detection_metrics` adds ``<key>_ci_low`` / ``<key>_ci_high``.
DETECTION_KEYS: tuple[str, ...] = ("sensitivity", "specificity", "accuracy", "f1", "auroc")


def called(score: ArrayLike, threshold: float) -> Any:
    """Whether ``score`` calls COVID-19 at ``threshold``: ``score >= threshold``, so an image
    exactly at the threshold is called. The one comparison every per-image call, figure and plot
    makes (element-wise for an array of scores)."""
    return np.asarray(score) >= threshold


def detection_score(share: float, p_covid: float | None, score: str) -> float:
    """An image's COVID-19 score under ``detect.score``: the infected share of the lung
    (percent), the classifier's COVID-19 probability, or the mean of the infected fraction
    (share / 100) and that probability."""
    if score == "mask":
        return share
    if p_covid is None:
        raise ValueError(f"detect.score={score} needs the infection model's class probabilities")
    return p_covid if score == "classifier" else (share / 100.0 + p_covid) / 2.0


#: What the probability of COVID-19 that ``detect/ece`` and the reliability diagram score is,
#: for each ``detect.score``.
SCORE_AS_PROBABILITY = {
    "mask": "infected share of the lung (as a probability of COVID-19)",
    "classifier": "classifier's probability of COVID-19",
    "mean": "mean of the infected fraction and the classifier's probability",
}


def score_probability(scores: np.ndarray, score: str) -> np.ndarray:
    """Detection scores as probabilities of COVID-19: the infected share of the lung is a
    percent (``mask``), the other scores are already in [0, 1]."""
    return scores / 100.0 if score == "mask" else scores


def operating_points(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct detection outcome on these images, by threshold (ascending).

    Returns the candidate thresholds (the distinct scores, then one above the maximum: "call
    nothing"), and for each the true-positive and true-negative counts under ``s >= threshold``.
    """
    candidates = np.unique(s)
    candidates = np.append(candidates, candidates[-1] + 1.0)
    pos = np.sort(s[t])
    neg = np.sort(s[~t])
    tp = pos.size - np.searchsorted(pos, candidates, side="left")  # positives with s >= thr
    tn = np.searchsorted(neg, candidates, side="left")  # negatives with s < thr
    return candidates, tp.astype(np.int64), tn.astype(np.int64)


def choose_threshold(scores: ArrayLike, truth: ArrayLike) -> float:
    """The detection threshold that maximises sensitivity + specificity (Youden's J) on these
    images; an image is then called COVID-19 when ``score >= threshold``.

    The calls that can differ are those of the distinct scores: call every image scoring at or
    above one of them, or call nothing. J is compared exactly, in integer counts
    (``tp * N + tn * P``), so ties are real ties and not rounding. Ties go to the calls that
    call the most images COVID-19: in screening a missed COVID-19 case costs more than a false
    alarm. One consequence: calling nothing (J = 0 + 1) always ties with calling everything
    (J = 1 + 0), so everything is called when the scores carry no information at all.

    The threshold returned makes exactly the chosen calls on these images, and lies midway
    between the two neighbouring distinct scores it separates (:func:`midway`), not on the
    lowest score it calls: an image scoring a hair below that one elsewhere is then not missed
    by a hair, and the threshold favours neither side of the gap.

    Raises:
        ValueError: lengths differ, inputs are empty or not finite, truth is not 0/1, or truth
            holds one class only (sensitivity or specificity is then undefined, so no threshold
            can be chosen).
    """
    who = "choose_threshold"
    s, t = binary_inputs(scores, truth, who)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        held = "no COVID-19 image (all 0)" if n_pos == 0 else "only COVID-19 images (all 1)"
        raise ValueError(
            f"{who}: truth holds {held}; choosing a threshold needs both COVID-19 and other images"
        )
    candidates, tp, tn = operating_points(s, t)
    youden = tp * n_neg + tn * n_pos  # J * P * N, exact
    best = int(np.argmax(youden))  # argmax: the first (smallest) of the ties
    return midway(candidates[:-1], best)


#: How far beyond a lone distinct score the threshold goes when no neighbour gives a gap.
_LONE_MARGIN = 1.0


def midway(distinct: np.ndarray, first_called: int) -> float:
    """The threshold that calls the scores of ``distinct`` (ascending, unique) from index
    ``first_called`` on (``len(distinct)``: none) under ``score >= threshold``: midway between
    the highest score left uncalled and the lowest one called.

    At the ends there is one neighbour only: below the lowest score (call every image) or above
    the highest (call none) the threshold lies half the gap to the next score away, as far as a
    midpoint would; with a single distinct score, :data:`_LONE_MARGIN` away. Where two scores
    are so close that no float lies strictly between them, the threshold is the upper one, which
    still separates them under ``>=``.
    """
    u = np.asarray(distinct, dtype=np.float64)
    k = u.size
    if k == 0 or not 0 <= first_called <= k:
        raise ValueError(f"midway: index {first_called} is not in 0..{k} of {k} distinct scores")
    if 0 < first_called < k:
        low, high = u[first_called - 1], u[first_called]
        mid = low + (high - low) / 2.0
        return float(mid if low < mid <= high else high)
    if first_called == 0:  # below the lowest score: every image is called
        gap = (u[1] - u[0]) / 2.0 if k > 1 else _LONE_MARGIN
        below = u[0] - gap
        return float(below if below < u[0] else np.nextafter(u[0], -np.inf))
    gap = (u[-1] - u[-2]) / 2.0 if k > 1 else _LONE_MARGIN  # above the highest: none is called
    above = u[-1] + gap
    return float(above if above > u[-1] else np.nextafter(u[-1], np.inf))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 1 where ``den`` is 0 (the project's rule, see the module docstring)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def weighted_auroc(weights: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` (R x n: how many times each image counts), NaN for a
    row whose counted images hold one class only.

    The Mann-Whitney form: the share of (COVID-19, other) pairs in which the COVID-19 image
    scores higher, a tie counting one half; threshold-free, and equal to the trapezoidal area
    under the ROC curve. Images are grouped by distinct score, so a row costs O(n).
    """
    order = np.argsort(s, kind="stable")
    ss, pos = s[order], t[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    w_pos = np.add.reduceat(w * pos, starts, axis=1)  # R x distinct scores
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg  # negatives scoring strictly lower
    wins = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _detection_figures(
    weights: np.ndarray, s: np.ndarray, t: np.ndarray, pred: np.ndarray
) -> dict[str, np.ndarray]:
    """The detection figures for each row of ``weights`` (R x n image counts): one row of ones
    for the images as given, one row per resample for the bootstrap."""
    tp = weights @ (pred & t).astype(np.float64)
    fp = weights @ (pred & ~t).astype(np.float64)
    fn = weights @ (~pred & t).astype(np.float64)
    tn = weights @ (~pred & ~t).astype(np.float64)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": weighted_auroc(weights, s, t),
    }


#: Resamples are scored this many image draws at a time, to bound memory on large splits.
_BOOT_CHUNK = 2_000_000


def _bootstrap_counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Resamples of ``n`` images drawn with replacement, as blocks of rows: how many times each
    image is drawn in each resample (rows x ``n``), ``n_boot`` rows in all."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK // n)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        draws = rng.integers(0, n, size=(m, n))
        flat = (draws + (np.arange(m) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)


def detection_metrics(
    scores: ArrayLike,
    truth: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, float]:
    """Detection figures at ``threshold`` (COVID-19 when ``score >= threshold``), each with a
    percentile-bootstrap interval over images.

    Keys: ``sensitivity``, ``specificity``, ``accuracy``, ``f1`` (COVID-19 the positive class),
    ``auroc`` (from the scores, threshold-free), and for each ``<key>_ci_low`` /
    ``<key>_ci_high``. The interval resamples the images with replacement ``n_boot`` times
    (deterministic for a given ``seed``) and takes the ``(1 - ci) / 2`` and ``(1 + ci) / 2``
    quantiles of the resampled figures; the threshold stays fixed, as it was chosen elsewhere.

    Zero denominators follow the project's rule (1; see the module docstring), in the resamples
    too. AUROC is NaN when the images hold one class; resamples that hold one class are left out
    of its interval (which is then conditional on both classes being drawn), and the interval is
    NaN when every resample is left out.

    Raises:
        ValueError: lengths differ, inputs are empty or not finite, truth is not 0/1, the
            threshold is not finite, ``n_boot < 1`` or ``ci`` is not in (0, 1).
    """
    who = "detection_metrics"
    s, t = binary_inputs(scores, truth, who)
    threshold = check_threshold(threshold, who)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"{who}: n_boot must be a whole number >= 1, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"{who}: ci is the interval's coverage, in (0, 1); got {ci!r}")
    pred = called(s, threshold)

    point = _detection_figures(np.ones((1, s.size)), s, t, pred)
    blocks = [
        _detection_figures(counts, s, t, pred)
        for counts in _bootstrap_counts(s.size, int(n_boot), seed)
    ]
    resampled = {key: np.concatenate([b[key] for b in blocks]) for key in DETECTION_KEYS}
    quantiles = [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0]
    out: dict[str, float] = {}
    for key in DETECTION_KEYS:
        values = resampled[key]
        values = values[~np.isnan(values)]  # only AUROC's one-class resamples are NaN
        low, high = np.quantile(values, quantiles) if values.size else (np.nan, np.nan)
        out[key] = float(point[key][0])
        out[f"{key}_ci_low"] = float(low)
        out[f"{key}_ci_high"] = float(high)
    return out
