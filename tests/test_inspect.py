"""``python -m covidqu.data inspect``: counts, and every bad file named without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidqu.data.__main__ import main
from covidqu.data.layout import INFECTION_MASKS_DIR, LUNG_MASKS_DIR, OFFICIAL_COUNTS, SUBSET_DIRS
from covidqu.data.readers import ImageDecodeError, read_image, read_mask

from conftest import SYNTH_PER_CLASS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the command as a user does, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "covidqu.data", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def inspect_json(root: Path, *extra: str) -> tuple[int, dict]:
    proc = run_cli("inspect", root, "--json", *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_counts_on_a_synthetic_tree(synth_root: Path):
    code, report = inspect_json(synth_root, "--verify")
    assert code == 0
    assert report["problems"] == []
    assert len(report["counts"]) == 18
    assert set(report["counts"].values()) == {SYNTH_PER_CLASS}
    assert report["official"]["lung/train/COVID-19"] == OFFICIAL_COUNTS["lung", "train", "COVID-19"]


def test_table_shows_found_beside_official(synth_root: Path, capsys: pytest.CaptureFixture):
    assert main(["inspect", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "3 /  7,658" in out  # lung / train / COVID-19: found beside official
    assert "27 / 33,920" in out  # lung subset total
    assert "27 /  5,826" in out  # infection subset total
    assert "no problems found" in out and "--verify" in out


def test_counts_on_the_real_sample(sample_root: Path):
    code, report = inspect_json(sample_root, "--verify")
    assert code == 0, report["problems"]
    expected = {"train": 3, "val": 2, "test": 2}
    for key, n in report["counts"].items():
        assert n == expected[key.split("/")[1]], key


def test_subset_folder_root(synth_root: Path):
    code, report = inspect_json(synth_root / SUBSET_DIRS["infection"])
    assert code == 0
    assert set(report["counts"]) == {k for k in report["counts"] if k.startswith("infection/")}


def _write(path: Path, arr: np.ndarray) -> None:
    assert cv2.imwrite(str(path), arr)


def corrupt(root: Path) -> dict[str, str]:
    """Break one file in each way that matters; return relative path -> expected problem words."""
    lung = root / SUBSET_DIRS["lung"] / SUBSET_DIRS["lung"]
    inf = root / SUBSET_DIRS["infection"] / SUBSET_DIRS["infection"]
    expected: dict[str, str] = {}

    def pick(folder: Path, kind: str, i: int) -> Path:
        return sorted((folder / kind).iterdir())[i]

    # truncated image PNG
    p = pick(lung / "Train" / "COVID-19", "images", 0)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expected[p.relative_to(root).as_posix()] = "unreadable image"
    # zero-byte mask
    p = pick(lung / "Val" / "Normal", LUNG_MASKS_DIR, 0)
    p.write_bytes(b"")
    expected[p.relative_to(root).as_posix()] = "empty file"
    # missing mask -> orphan image
    p = pick(lung / "Test" / "Non-COVID", LUNG_MASKS_DIR, 0)
    p.unlink()
    img = lung / "Test" / "Non-COVID" / "images" / p.name
    expected[img.relative_to(root).as_posix()] = "has no mask"
    # orphan mask
    p = pick(inf / "Train" / "Normal", "images", 1)
    p.unlink()
    for kind in (LUNG_MASKS_DIR, INFECTION_MASKS_DIR):
        m = inf / "Train" / "Normal" / kind / p.name
        expected[m.relative_to(root).as_posix()] = "mask has no image"
    # size mismatch
    p = pick(inf / "Val" / "COVID-19", LUNG_MASKS_DIR, 0)
    _write(p, np.zeros((20, 30), np.uint8))
    expected[p.relative_to(root).as_posix()] = "but its image is"
    # non-binary mask
    p = pick(inf / "Test" / "COVID-19", INFECTION_MASKS_DIR, 1)
    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    arr[0, :4] = [0, 17, 128, 255]
    _write(p, arr)
    expected[p.relative_to(root).as_posix()] = "not binary"
    # infection in a Normal image
    p = pick(inf / "Test" / "Normal", INFECTION_MASKS_DIR, 0)
    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    arr[10:14, 10:14] = 255
    _write(p, arr)
    expected[p.relative_to(root).as_posix()] = "is not empty"
    return expected


def test_verify_names_every_bad_file(synth_copy: Path):
    expected = corrupt(synth_copy)
    code, report = inspect_json(synth_copy, "--verify")
    assert code == 1
    found: dict[str, list[str]] = {}
    for p in report["problems"]:
        found.setdefault(p["path"], []).append(p["problem"])
    assert set(found) == set(expected)
    for path, words in expected.items():
        assert any(words in problem for problem in found[path]), (path, found[path])


def test_without_verify_structural_problems_are_still_found(synth_copy: Path):
    expected = corrupt(synth_copy)
    code, report = inspect_json(synth_copy)
    assert code == 1
    structural = {p for p, w in expected.items() if w in ("has no mask", "mask has no image")}
    assert {p["path"] for p in report["problems"]} == structural


def test_table_lists_problems_without_traceback(synth_copy: Path):
    expected = corrupt(synth_copy)
    proc = run_cli("inspect", synth_copy, "--verify")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    for path in expected:
        assert path in proc.stdout
    assert f"{len(expected)} problem(s)" in proc.stdout


def test_not_a_tree_exits_2_and_says_why(tmp_path: Path):
    (tmp_path / "random").mkdir()
    proc = run_cli("inspect", tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a COVID-QU-Ex tree" in proc.stderr and "random/" in proc.stderr
    proc = run_cli("inspect", tmp_path / "missing", "--json")
    assert proc.returncode == 2
    assert "does not exist" in json.loads(proc.stdout)["error"]


def test_loading_a_corrupt_file_names_it(synth_copy: Path):
    p = sorted((synth_copy / SUBSET_DIRS["lung"]).rglob("*.png"))[0]
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ImageDecodeError, match=str(p).replace("(", r"\(").replace(")", r"\)")):
        read_image(p)
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        read_mask(p)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        read_image(p.with_name("absent.png"))
