"""Severity: the infected share of the lung, its grade, and how well both match the truth.

The seed paper (Tahir et al. 2021) quantifies COVID-19 as the share of the lung area that is
infected. Infection is only counted inside the lung: a predicted lesion outside the predicted
lung (a stray blob over the heart or the abdomen) is not part of any lung.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torchmetrics.functional.classification import multiclass_cohen_kappa

from covidqu.errors import ConfigError
from covidqu.scoring.inputs import grade_indices, vector

#: The severity figures :func:`severity_metrics` returns.
SEVERITY_KEYS: tuple[str, ...] = ("mae_pct", "pearson", "grade_acc", "grade_kappa")
#: Severity grades, mildest first: the order grade figures (accuracy, kappa) rank them in.
GRADES: tuple[str, ...] = ("none", "mild", "moderate", "severe", "critical")


def infected_share(lung: np.ndarray, infection: np.ndarray) -> float:
    """Percentage of the lung's pixels that are infected (0 for an image without lung)."""
    lung = np.asarray(lung) > 0
    inside = (np.asarray(infection) > 0) & lung
    area = int(lung.sum())
    return 100.0 * int(inside.sum()) / area if area else 0.0


def check_cutoffs(cutoffs: Mapping[str, float]) -> dict[str, float]:
    """The grade cut-offs (``grades.<grade>``, percent of the lung), checked: one lower bound
    for each grade above ``none``, within 0..100 and rising with the grade."""
    names = GRADES[1:]
    if not isinstance(cutoffs, Mapping) or set(cutoffs) != set(names):
        raise ConfigError(
            f"grades must give one lower bound (percent of the lung) for each of {list(names)}; "
            f"got {sorted(cutoffs) if isinstance(cutoffs, Mapping) else cutoffs!r}"
        )
    values = [float(cutoffs[name]) for name in names]
    if not all(0.0 <= v <= 100.0 for v in values) or values != sorted(set(values)):
        raise ConfigError(
            "grades.* must rise from mild to critical within 0..100 (percent of the lung), got "
            + ", ".join(f"grades.{n}={v}" for n, v in zip(names, values, strict=True))
        )
    return dict(zip(names, values, strict=True))


def grade(share_pct: float, cutoffs: Mapping[str, float]) -> str:
    """The grade of an infected share: the highest grade whose lower bound it exceeds; ``none``
    when it exceeds none of them. A share exactly at a bound stays in the grade below."""
    found = GRADES[0]
    for name in GRADES[1:]:
        if share_pct > cutoffs[name]:
            found = name
    return found


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute difference, in the inputs' unit (percentage points of the lung)."""
    return float(np.mean(np.abs(pred - true)))


def pearson(pred: np.ndarray, true: np.ndarray) -> float:
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
    p = vector(pred_pct, "pred_pct", who)
    y = vector(true_pct, "true_pct", who)
    pg, tg = grade_indices(grades, who, pred_grade=pred_grade, true_grade=true_grade)
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
        "mae_pct": mae(p, y),
        "pearson": pearson(p, y),
        "grade_acc": float(np.mean(pg == tg)),
        "grade_kappa": kappa,
    }


def confusion_counts(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    """k x k image counts: rows the true grade, columns the predicted one."""
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
