"""What says an image went wrong, read from its per-image row: one ranking for the worst-images
gallery of the report page and for the overlays a test run keeps of its worst images, so that
the gallery finds an overlay for every image it shows.

- a classifier's row (a ``class`` and ``p_<class>`` columns): the probability it gave to the
  classes the image is not, ``1 - p_<true class>`` (the per-image loss is not written; this is
  its monotone cousin);
- an analysis row (``lung_dice`` / ``infection_dice``): ``1 -`` the worse stage's Dice;
- a segmentation row (``dice``): ``1 - dice``.

Larger is worse; ties go to the image whose name sorts first. Each value is read as
``per_image.csv`` writes it (:data:`SIGNIFICANT` significant digits), so a float seen in a
test step and the same float read back from the file rank alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The significant digits of the floats a per-image table holds (``runtime.outputs`` writes
#: them so).
SIGNIFICANT = 6
CLASS_LABEL = "wrong-class probability"
STAGES_LABEL = "1 - the worse stage's Dice"
DICE_LABEL = "1 - Dice"
STAGE_COLUMNS = ("lung_dice", "infection_dice")


def as_written(value: Any) -> float | None:
    """``value`` as a finite float rounded as the table writes it; ``None`` for empty cells,
    text, NaN and infinities."""
    try:
        out = float(f"{float(value):.{SIGNIFICANT}g}")
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) or math.isinf(out) else out


def badness(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(what ranks, how bad)`` for one row; ``None`` where the row has nothing to rank by."""
    if "class" in row and any(str(k).startswith("p_") for k in row):
        p = as_written(row.get(f"p_{row.get('class')}"))
        return None if p is None else (CLASS_LABEL, 1.0 - p)
    stages = [c for c in STAGE_COLUMNS if c in row]
    columns = stages or (["dice"] if "dice" in row else [])
    values = [v for v in (as_written(row.get(c)) for c in columns) if v is not None]
    if not values:
        return None
    return (STAGES_LABEL if stages else DICE_LABEL), 1.0 - min(values)


def name_of(row: Mapping[str, Any]) -> str:
    """The image a row is of: its ``id``, or its ``file``'s stem (analyze)."""
    if row.get("id"):
        return str(row["id"])
    return Path(str(row.get("file", ""))).stem


def worst_first(bad: float, name: str) -> tuple[float, str]:
    """The sort key that puts the worst image first (ties: the name that sorts first)."""
    return -bad, name
