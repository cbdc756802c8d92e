"""The analysis's plots: the ROC curve with its operating point, predicted against true
severity, and the grade confusion matrix.

They write PNG files through matplotlib's Agg canvas on a bare ``Figure``: no pyplot, so no
global figure state and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from covidqu.files import bytes_of, write_atomic
from covidqu.scoring.detection import called, operating_points, weighted_auroc
from covidqu.scoring.inputs import binary_inputs, check_threshold, grade_indices, vector
from covidqu.scoring.severity import confusion_counts, mae, pearson

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(width: float = 5.0, height: float = 5.0) -> Figure:
    """A bare matplotlib figure on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically (parent folders made)."""
    return write_atomic(path, bytes_of(lambda buffer: fig.savefig(buffer, format="png")))


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def plot_roc(scores: ArrayLike, truth: ArrayLike, threshold: float, path: str | Path) -> Path:
    """Write the ROC curve of ``scores`` (AUROC in the legend) with the operating point of
    ``threshold`` marked, as a PNG at ``path`` (parent folders made); return the path.

    Raises:
        ValueError: as :func:`choose_threshold`; a ROC curve needs both classes.
    """
    who = "plot_roc"
    s, t = binary_inputs(scores, truth, who)
    threshold = check_threshold(threshold, who)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{who}: truth holds one class only; a ROC curve needs both")
    _, tp, tn = operating_points(s, t)
    tpr, fpr = tp[::-1] / n_pos, 1.0 - tn[::-1] / n_neg  # from "call nothing" to "call all"
    area = float(weighted_auroc(np.ones((1, s.size)), s, t)[0])
    pred = called(s, threshold)
    sens = float((pred & t).sum() / n_pos)
    spec = float((~pred & ~t).sum() / n_neg)

    fig = figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"ROC, AUROC = {area:.3f}")
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
    return save(fig, path)


def plot_severity(pred_pct: ArrayLike, true_pct: ArrayLike, path: str | Path) -> Path:
    """Write predicted against true severity (infected share of the lung, %) with the identity
    line, MAE and Pearson's r in the title, as a PNG at ``path``; return the path.

    Raises:
        ValueError: lengths differ, or inputs are empty or not finite.
    """
    who = "plot_severity"
    p = vector(pred_pct, "pred_pct", who)
    y = vector(true_pct, "true_pct", who)
    if p.size != y.size:
        raise ValueError(f"{who}: pred_pct has {p.size} values and true_pct {y.size}")
    lo = min(0.0, float(p.min()), float(y.min()))
    hi = max(100.0, float(p.max()), float(y.max()))
    pad = 0.02 * (hi - lo)

    fig = figure()
    ax = fig.add_subplot()
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.5", linewidth=1, label="identity")
    ax.scatter(y, p, s=12, alpha=0.6, color="C0", edgecolors="none", label=f"{p.size} images")
    return _finish_square(
        fig,
        (lo - pad, hi + pad),
        "true severity (% of lung infected)",
        "predicted severity (% of lung infected)",
        f"MAE {mae(p, y):.2f} pp, Pearson r {_fmt(pearson(p, y), '.3f')}",
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
    pg, tg = grade_indices(grades, who, pred_grade=pred_grade, true_grade=true_grade)
    if pg.size != tg.size:
        raise ValueError(f"{who}: pred_grade has {pg.size} values and true_grade {tg.size}")
    k = len(grades)
    counts = confusion_counts(pg, tg, k)
    acc = float(np.mean(pg == tg))

    fig = figure(1.1 * k + 2.0, 1.1 * k + 2.0)
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
    return save(fig, path)
