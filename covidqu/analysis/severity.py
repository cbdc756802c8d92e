"""Severity: the infected share of the lung, and its grade.

The seed paper (Tahir et al. 2021) quantifies COVID-19 as the share of the lung area that is
infected. Infection is only counted inside the lung: a predicted lesion outside the predicted
lung (a stray blob over the heart or the abdomen) is not part of any lung.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from covidqu.errors import ConfigError

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
    if set(cutoffs) != set(names):
        raise ConfigError(
            f"grades must give one lower bound (percent of the lung) for each of {list(names)}; "
            f"got {sorted(cutoffs)}"
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
