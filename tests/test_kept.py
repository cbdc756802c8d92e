"""The overlays a test run keeps: the split's first images and its worst, ranked as the report's
gallery ranks the per-image table (one ranking, :mod:`covidqu.scoring.worst`), built only for
the images that enter."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from covidqu.models.kept import KeptOverlays
from covidqu.report.gallery import worst
from covidqu.runtime.outputs import write_rows


def _offer_in_batches(kept: KeptOverlays, rows: list[dict], batch: int) -> list[list[int]]:
    """Offer ``rows`` batch by batch; what each batch was asked to build."""
    built: list[list[int]] = []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]

        def make(at: list[int], part: list[dict] = part) -> list[dict]:
            built.append(list(at))
            return [{"id": part[i]["id"]} for i in at]

        kept.offer(part, make)
    return built


def _segmentation_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"id": f"img_{i:03d}", "class": "COVID-19", "dice": rng.random()} for i in range(n)]
    # ties the gallery breaks by name, and a near-tie the table's six digits make a tie
    rows[7]["dice"] = rows[3]["dice"] = 0.0
    rows[5]["dice"] = 0.0123456789  # the higher Dice, yet ranked first by name: both 0.0123457
    rows[11]["dice"] = 0.0123456711
    rows[9]["dice"] = float("nan")  # nothing to rank by: never kept as a worst
    return rows


def test_the_worst_kept_are_the_gallery_s_worst(tmp_path: Path) -> None:
    rows = _segmentation_rows(40)
    kept = KeptOverlays(first=0, worst=5)
    _offer_in_batches(kept, rows, batch=6)
    write_rows(tmp_path / "per_image.csv", rows)
    _, shown = worst(tmp_path, 5)
    assert [item["id"] for item in kept.gathered()] == [w.name for w in shown]
    assert [w.name for w in shown][:4] == ["img_003", "img_007", "img_005", "img_011"]


def test_only_the_images_that_enter_are_built() -> None:
    # dice rising with the index: after the first batch, no later image is worse
    rows = [{"id": f"i{i:02d}", "class": "Normal", "dice": i / 100} for i in range(30)]
    kept = KeptOverlays(first=0, worst=3)
    built = _offer_in_batches(kept, rows, batch=5)
    assert built == [[0, 1, 2]]
    assert [item["id"] for item in kept.gathered()] == ["i00", "i01", "i02"]
    # falling: every batch's worst 3 enter, the rest are never built
    kept = KeptOverlays(first=0, worst=3)
    built = _offer_in_batches(kept, rows[::-1], batch=5)
    assert all(len(at) == 3 for at in built)
    assert [item["id"] for item in kept.gathered()] == ["i00", "i01", "i02"]


def test_first_and_worst_together_each_image_once() -> None:
    rows = [{"id": f"i{i:02d}", "class": "Normal", "dice": 1 - i / 100} for i in range(20)]
    kept = KeptOverlays(first=4, worst=3)
    built = _offer_in_batches(kept, rows, batch=3)
    assert [item["id"] for item in kept.gathered()] == [
        "i00",
        "i01",
        "i02",
        "i03",
        "i19",
        "i18",
        "i17",
    ]
    assert built[0] == [0, 1, 2] and built[1][0] == 0  # one build per image, both lists
    again = KeptOverlays(first=5, worst=5)
    _offer_in_batches(again, rows[:5], batch=5)
    assert [item["id"] for item in again.gathered()] == ["i00", "i01", "i02", "i03", "i04"]


def test_a_classifier_ranks_by_the_probability_of_the_wrong_classes(tmp_path: Path) -> None:
    p_true = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.05, "e": 0.4}
    rows = []
    for name, p in p_true.items():
        row = {"id": name, "class": "Normal", "p_COVID-19": (1 - p) / 2}
        row.update({"p_Non-COVID": (1 - p) / 2, "p_Normal": p})
        rows.append(row)
    kept = KeptOverlays(first=0, worst=2)
    _offer_in_batches(kept, rows, batch=2)
    assert [item["id"] for item in kept.gathered()] == ["d", "b"]
    with open(tmp_path / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert [w.name for w in worst(tmp_path, 2)[1]] == ["d", "b"]


def test_nothing_is_kept_or_built_when_nothing_is_asked() -> None:
    rows = _segmentation_rows(12)
    kept = KeptOverlays()
    assert _offer_in_batches(kept, rows, batch=4) == []
    assert kept.gathered() == []
