"""The checks every scoring function makes of its inputs: one finite value per image, 0/1
truths, grade names of a known scale; a ValueError that names the input otherwise."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def vector(values: ArrayLike, name: str, who: str) -> np.ndarray:
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


def binary_inputs(scores: ArrayLike, truth: ArrayLike, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 and truth as bool (True = COVID-19), one of each per image."""
    s = vector(scores, "scores", who)
    t = vector(truth, "truth", who)
    if s.size != t.size:
        raise ValueError(
            f"{who}: scores and truth differ in length ({s.size} scores, {t.size} truth "
            "values); pass one score and one truth value per image"
        )
    odd = np.unique(t[(t != 0) & (t != 1)])
    if odd.size:
        raise ValueError(f"{who}: truth must be 1 (COVID-19) or 0 (not), got {odd[:5].tolist()}")
    return s, t == 1


def check_threshold(threshold: float, who: str) -> float:
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"{who}: threshold must be a finite number, got {threshold!r}")
    return value


def grade_indices(grades: Sequence[str], who: str, **named: Sequence[str]) -> list[np.ndarray]:
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
