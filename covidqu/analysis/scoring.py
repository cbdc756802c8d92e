"""Score the two-stage analysis against the truth: COVID-19 detection, severity, and plots.

Detection calls an image COVID-19 when its ``covid_score`` (the infected share of the lung, in
percent) is at or above a threshold: ``score >= threshold``, everywhere in this module.
:func:`choose_threshold` picks that threshold on one split (never the split it is scored on);
:func:`detection_metrics` scores it with percentile-bootstrap intervals over images, so that a
difference between two models can be told from the luck of which images the split holds.
:func:`severity_metrics` compares the predicted infected share and grade with the true ones.

Zero denominators follow the project's rule (see :mod:`covidqu.models.metrics`): a ratio whose
denominator is zero is 1, because there was nothing it measures and so nothing got wrong. So
sensitivity is 1 on images that hold no COVID-19 case, specificity is 1 on images that hold no
other case, and F1 is 1 when there is no COVID-19 case and none is called. AUROC has no such
reading: it is NaN when the images hold one class only.

AUROC is computed here, not with torchmetrics' ``binary_auroc``: that one takes scores outside
[0, 1] for logits and passes them through a sigmoid, which rounds every percentage above about
37 to exactly 1.0 and so turns distinct scores into ties; and the bootstrap needs it over a
thousand resamples at once, as weighted counts (see :func:`_auroc`).

The plots write PNG files through matplotlib's Agg canvas on a bare ``Figure``: no pyplot, so no
global figure state and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torchmetrics.functional.classification import multiclass_cohen_kappa

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DETECTION_KEYS",
    "SEVERITY_KEYS",
    "choose_threshold",
    "detection_metrics",
    "plot_grade_confusion",
    "plot_roc",
    "plot_severity",
    "severity_metrics",
]

#: The detection figures; :func:`detection_metrics` adds ``<key>_ci_low`` / ``<key>_ci_high``.
DETECTION_KEYS: tuple[str, ...] = ("sensitivity", "specificity", "accuracy", "f1", "auroc")
#: The severity figures :func:`severity_metrics` returns.
SEVERITY_KEYS: tuple[str, ...] = ("mae_pct", "pearson", "grade_acc", "grade_kappa")

# ---------------------------------------------------------------------------------------------
# Input checks


def _vector(values: ArrayLike, name: str, who: str) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers, or a ValueError naming ``name``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{who}: {name} must be one value per image (1-D), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{who}: {name} is empty; there are no images to score")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{who}: {name} holds {bad.size} non-finite value(s) (NaN or inf), first at "
            f"position {int(bad[0])}"
        )
    return arr


def _binary_inputs(scores: ArrayLike, truth: ArrayLike, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 and truth as bool (True = COVID-19), one of each per image."""
    s = _vector(scores, "scores", who)
    t = _vector(truth, "truth", who)
    if s.size != t.size:
        raise ValueError(
            f"{who}: scores and truth differ in length ({s.size} scores, {t.size} truth "
            "values); pass one score and one truth value per image"
        )
    odd = np.unique(t[(t != 0) & (t != 1)])
    if odd.size:
        raise ValueError(f"{who}: truth must be 1 (COVID-19) or 0 (not), got {odd[:5].tolist()}")
    return s, t == 1


def _check_threshold(threshold: float, who: str) -> float:
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"{who}: threshold must be a finite number, got {threshold!r}")
    return value


def _grade_indices(grades: Sequence[str], who: str, **named: Sequence[str]) -> list[np.ndarray]:
    """Each of ``named``'s grade names as its index in ``grades`` (the order of severity)."""
    order = list(grades)
    if not order:
        raise ValueError(f"{who}: grades is empty; pass the grade names in order of severity")
    if len(set(order)) != len(order):
        raise ValueError(f"{who}: grades repeats a name: {order}")
    index = {g: i for i, g in enumerate(order)}
    out = []
    for name, values in named.items():
        values = list(values)
        if not values:
            raise ValueError(f"{who}: {name} is empty; there are no images to score")
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise ValueError(f"{who}: {name} holds grades {unknown} that are not in {order}")
        out.append(np.asarray([index[v] for v in values], dtype=np.int64))
    return out


# ---------------------------------------------------------------------------------------------
# Detection


def _operating_points(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    Candidates are the distinct scores, plus one above the maximum (call nothing); any threshold
    between two neighbouring scores gives the same calls as the upper one, so nothing else can do
    better here. J is compared exactly, in integer counts (``tp * N + tn * P``), so ties are
    real ties and not rounding.

    Ties go to the smallest threshold: it calls the most images COVID-19, and in screening a
    missed COVID-19 case costs more than a false alarm. One consequence: calling nothing
    (J = 0 + 1) always ties with calling everything (J = 1 + 0, the smallest score), so the
    "call nothing" candidate is never returned; the smallest score is returned when the scores
    carry no information at all.

    The threshold is a score seen here, so it sits right at the lowest-scoring COVID-19 image
    that it calls: choose it on a split other than the one it is scored on (design contract).

    Raises:
        ValueError: lengths differ, inputs are empty or not finite, truth is not 0/1, or truth
            holds one class only (sensitivity or specificity is then undefined, so no threshold
            can be chosen).
    """
    who = "choose_threshold"
    s, t = _binary_inputs(scores, truth, who)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        held = "no COVID-19 image (all 0)" if n_pos == 0 else "only COVID-19 images (all 1)"
        raise ValueError(
            f"{who}: truth holds {held}; choosing a threshold needs both COVID-19 and other images"
        )
    candidates, tp, tn = _operating_points(s, t)
    youden = tp * n_neg + tn * n_pos  # J * P * N, exact
    return float(candidates[int(np.argmax(youden))])  # argmax: first (smallest) of the ties


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 1 where ``den`` is 0 (the project's rule, see the module docstring)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _auroc(weights: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
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
        "auroc": _auroc(weights, s, t),
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
    s, t = _binary_inputs(scores, truth, who)
    threshold = _check_threshold(threshold, who)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"{who}: n_boot must be a whole number >= 1, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"{who}: ci is the interval's coverage, in (0, 1); got {ci!r}")
    pred = s >= threshold

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


# ---------------------------------------------------------------------------------------------
# Severity


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true)))


def _pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (checked exactly: the mean of equal floats
    need not equal them, which would make a constant look like noise)."""
    if np.ptp(pred) == 0 or np.ptp(true) == 0:
        return math.nan
    dp, dt = pred - pred.mean(), true - true.mean()
    r = float(np.sum(dp * dt) / math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt))))
    return min(1.0, max(-1.0, r))


def severity_metrics(
    pred_pct: ArrayLike,
    true_pct: ArrayLike,
    pred_grade: Sequence[str],
    true_grade: Sequence[str],
    grades: Sequence[str],
) -> dict[str, float]:
    """How well the predicted severity matches the true one, per image.

    Keys: ``mae_pct`` (mean absolute error of the infected share, in percentage points),
    ``pearson`` (correlation of predicted and true share; NaN when either is constant),
    ``grade_acc`` (share of images whose grade is right) and ``grade_kappa`` (Cohen's kappa with
    quadratic weights over ``grades`` in their given order of severity, so that calling a
    critical case mild costs more than calling it severe). Kappa is 1 when both sides hold one
    and the same grade throughout: its denominator is then zero, and the project's rule applies.

    Raises:
        ValueError: the four inputs differ in length, are empty or not finite, or a grade is
            not one of ``grades``.
    """
    who = "severity_metrics"
    p = _vector(pred_pct, "pred_pct", who)
    y = _vector(true_pct, "true_pct", who)
    pg, tg = _grade_indices(grades, who, pred_grade=pred_grade, true_grade=true_grade)
    lengths = {"pred_pct": p.size, "true_pct": y.size, "pred_grade": pg.size, "true_grade": tg.size}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{who}: inputs differ in length {lengths}; pass one of each per image")

    if np.ptp(pg) == 0 and np.ptp(tg) == 0 and pg[0] == tg[0]:
        kappa = 1.0
    else:
        kappa = float(
            multiclass_cohen_kappa(
                torch.from_numpy(pg),
                torch.from_numpy(tg),
                num_classes=len(grades),
                weights="quadratic",
            )
        )
    return {
        "mae_pct": _mae(p, y),
        "pearson": _pearson(p, y),
        "grade_acc": float(np.mean(pg == tg)),
        "grade_kappa": kappa,
    }


def _confusion_counts(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    """k x k image counts: rows the true grade, columns the predicted one."""
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 5.0, height: float = 5.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def plot_roc(scores: ArrayLike, truth: ArrayLike, threshold: float, path: str | Path) -> Path:
    """Write the ROC curve of ``scores`` (AUROC in the legend) with the operating point of
    ``threshold`` marked, as a PNG at ``path`` (parent folders made); return the path.

    Raises:
        ValueError: as :func:`choose_threshold`; a ROC curve needs both classes.
    """
    who = "plot_roc"
    s, t = _binary_inputs(scores, truth, who)
    threshold = _check_threshold(threshold, who)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{who}: truth holds one class only; a ROC curve needs both")
    _, tp, tn = _operating_points(s, t)
    tpr, fpr = tp[::-1] / n_pos, 1.0 - tn[::-1] / n_neg  # from "call nothing" to "call all"
    auroc = float(_auroc(np.ones((1, s.size)), s, t)[0])
    pred = s >= threshold
    sens = float((pred & t).sum() / n_pos)
    spec = float((~pred & ~t).sum() / n_neg)

    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"ROC, AUROC = {auroc:.3f}")
    ax.plot(
        [1.0 - spec],
        [sens],
        marker="o",
        markersize=8,
        color="C3",
        linestyle="none",
        label=f"threshold {threshold:g}: sens {sens:.3f}, spec {spec:.3f}",
    )
    return _finish_square(
        fig,
        (-0.02, 1.02),
        "1 - specificity (false-positive rate)",
        "sensitivity (true-positive rate)",
        f"COVID-19 detection ({n_pos} COVID-19, {n_neg} other)",
        "lower right",
        path,
    )


def _finish_square(
    fig: Any,
    limits: tuple[float, float],
    xlabel: str,
    ylabel: str,
    title: str,
    legend: str,
    path: str | Path,
) -> Path:
    """Square axes over ``limits`` on both sides, labelled, with a light grid and the legend at
    ``legend``; then the figure is saved to ``path``."""
    ax = fig.axes[0]
    ax.set(xlim=limits, ylim=limits, xlabel=xlabel, ylabel=ylabel, title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize="small")
    return _save(fig, path)


def plot_severity(pred_pct: ArrayLike, true_pct: ArrayLike, path: str | Path) -> Path:
    """Write predicted against true severity (infected share of the lung, %) with the identity
    line, MAE and Pearson's r in the title, as a PNG at ``path``; return the path.

    Raises:
        ValueError: lengths differ, or inputs are empty or not finite.
    """
    who = "plot_severity"
    p = _vector(pred_pct, "pred_pct", who)
    y = _vector(true_pct, "true_pct", who)
    if p.size != y.size:
        raise ValueError(f"{who}: pred_pct has {p.size} values and true_pct {y.size}")
    lo = min(0.0, float(p.min()), float(y.min()))
    hi = max(100.0, float(p.max()), float(y.max()))
    pad = 0.02 * (hi - lo)

    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.5", linewidth=1, label="identity")
    ax.scatter(y, p, s=12, alpha=0.6, color="C0", edgecolors="none", label=f"{p.size} images")
    return _finish_square(
        fig,
        (lo - pad, hi + pad),
        "true severity (% of lung infected)",
        "predicted severity (% of lung infected)",
        f"MAE {_mae(p, y):.2f} pp, Pearson r {_fmt(_pearson(p, y), '.3f')}",
        "upper left",
        path,
    )


def plot_grade_confusion(
    pred_grade: Sequence[str], true_grade: Sequence[str], grades: Sequence[str], path: str | Path
) -> Path:
    """Write the grade confusion matrix (image counts; rows the true grade, columns the
    predicted one, both in ``grades`` order, each count written in its cell) as a PNG at
    ``path``; return the path.

    Raises:
        ValueError: lengths differ, or a grade is not one of ``grades``.
    """
    who = "plot_grade_confusion"
    pg, tg = _grade_indices(grades, who, pred_grade=pred_grade, true_grade=true_grade)
    if pg.size != tg.size:
        raise ValueError(f"{who}: pred_grade has {pg.size} values and true_grade {tg.size}")
    k = len(grades)
    counts = _confusion_counts(pg, tg, k)
    acc = float(np.mean(pg == tg))

    fig = _figure(1.1 * k + 2.0, 1.1 * k + 2.0)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, int(counts.max())))
    for i in range(k):
        for j in range(k):
            dark = counts[i, j] > 0.6 * image.norm.vmax
            color = "white" if dark else "black"
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color)
    ax.set_xticks(range(k), labels=list(grades), rotation=30, ha="right")
    ax.set_yticks(range(k), labels=list(grades))
    ax.set(
        xlabel="predicted grade",
        ylabel="true grade",
        title=f"grade accuracy {acc:.1%} ({pg.size} images)",
    )
    return _save(fig, path)
