"""The worst images of an eval, a training run's test or an analysis, and their overlays.

Rows come from ``per_image.csv`` (eval, and a training run's test) or ``analysis.csv``
(analyze), ranked by :mod:`covidqu.scoring.worst`: a segmentation's per-image Dice (lowest
first), the worse of the two stages' Dice for an analysis, and for a classifier the probability
it gave to the classes the image is not (highest first).

An overlay is looked for where the commands write it: ``overlays/<id>.png`` (eval and a
training run's test keep those of the first ``num_overlays`` images and of the ``num_worst``
worst, by the same ranking) and ``<name>_overlay.png`` (analyze, every image). Where none was
written the gallery shows the row and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from covidqu.report.figures import read_csv
from covidqu.runtime.outputs import PER_IMAGE_FILE, safe_name
from covidqu.scoring.worst import badness, name_of, worst_first

#: What analyze writes, one row per image (``covidqu.analyze.run.ANALYSIS_FILE``; report may
#: not import analyze).
ANALYSIS_FILE = "analysis.csv"
#: How many images the gallery shows.
WORST_N = 12


@dataclass
class Worst:
    """One image of the gallery."""

    name: str
    cls: str
    badness_label: str
    badness: float
    overlay: Path | None
    details: dict[str, str]


def image_rows(folder: Path) -> tuple[str, list[dict[str, str]]]:
    """``(file name, rows)`` of the per-image table ``folder`` holds; ``("", [])`` if none."""
    for name in (ANALYSIS_FILE, PER_IMAGE_FILE):
        if (folder / name).is_file():
            return name, read_csv(folder / name)
    return "", []


def ranking(rows: Sequence[Mapping[str, str]]) -> tuple[str, dict[int, float]] | None:
    """``(what ranks, {row index: how bad})``: larger is worse; ``None`` if nothing ranks."""
    bad: dict[int, float] = {}
    label = ""
    for i, row in enumerate(rows):
        ranked = badness(row)
        if ranked is not None:
            label, bad[i] = ranked
    return (label, bad) if bad else None


def overlay_of(folder: Path, name: str) -> Path | None:
    """The overlay a command wrote for image ``name`` in ``folder``, if any."""
    for path in (folder / "overlays" / f"{safe_name(name)}.png", folder / f"{name}_overlay.png"):
        if path.is_file():
            return path
    return None


def worst(folder: Path, n: int = WORST_N) -> tuple[str, list[Worst]]:
    """The ``n`` worst images of ``folder``'s per-image table, worst first, and what ranks
    them (``("", [])`` where the folder has no table or nothing to rank by)."""
    _, rows = image_rows(folder)
    ranked = ranking(rows)
    if ranked is None:
        return "", []
    label, bad = ranked
    order = sorted(bad, key=lambda i: worst_first(bad[i], name_of(rows[i])))[:n]
    shown = []
    for i in order:
        row = rows[i]
        name = name_of(row)
        shown.append(
            Worst(
                name=name,
                cls=row.get("class", ""),
                badness_label=label,
                badness=bad[i],
                overlay=overlay_of(folder, name),
                details={k: v for k, v in row.items() if k not in ("id", "file") and v != ""},
            )
        )
    return label, shown
