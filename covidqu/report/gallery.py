"""The worst images of an eval, a training run's test or an analysis, and their overlays.

Rows come from ``per_image.csv`` (eval, and a training run's test) or ``analysis.csv``
(analyze). They are ranked by what says an image went wrong: a segmentation's per-image Dice
(lowest first), the worse of the two stages' Dice for an analysis, and for a classifier the
probability it gave to the classes the image is not (highest first; the per-image loss is not
written, and this is its monotone cousin).

An overlay is looked for where the commands write it: ``overlays/<id>.png`` (eval keeps the
first ``num_overlays`` images only) and ``<name>_overlay.png`` (analyze, every image). Where
none was written the gallery shows the row and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from covidqu.report.figures import number, read_csv
from covidqu.runtime.outputs import PER_IMAGE_FILE, safe_name

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


def _name(row: Mapping[str, str]) -> str:
    if row.get("id"):
        return row["id"]
    return Path(row.get("file", "")).stem


def ranking(rows: Sequence[Mapping[str, str]]) -> tuple[str, dict[int, float]] | None:
    """``(what ranks, {row index: how bad})``: larger is worse; ``None`` if nothing ranks."""
    if not rows:
        return None
    first = rows[0]
    if "class" in first and any(k.startswith("p_") for k in first):
        bad = {}
        for i, row in enumerate(rows):
            p = number(row.get(f"p_{row.get('class')}"))
            if p is not None:
                bad[i] = 1.0 - p
        return "wrong-class probability", bad
    stages = [c for c in ("lung_dice", "infection_dice") if c in first]
    columns = stages or (["dice"] if "dice" in first else [])
    if not columns:
        return None
    bad = {}
    for i, row in enumerate(rows):
        values = [number(row.get(c)) for c in columns]
        values = [v for v in values if v is not None]
        if values:
            bad[i] = 1.0 - min(values)
    label = "1 - the worse stage's Dice" if stages else "1 - Dice"
    return label, bad


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
    order = sorted(bad, key=lambda i: (-bad[i], _name(rows[i])))[:n]
    shown = []
    for i in order:
        row = rows[i]
        name = _name(row)
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
