"""The synthetic COVID-QU-Ex tree: layout, file formats, determinism, CXR-likeness, caching."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidqu.constants import CLASSES, SPLITS, SUBSETS
from covidqu.data import synth
from covidqu.data.layout import IMAGES_DIR, INFECTION_MASKS_DIR, SUBSET_DIRS, scan

PER_CLASS = 3
SIZE = 48
NAME_PATTERNS = {
    "COVID-19": re.compile(r"covid_(\d+)\.png"),
    "Non-COVID": re.compile(r"non_COVID \((\d+)\)\.png"),
    "Normal": re.compile(r"Normal \((\d+)\)\.png"),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tree"
    assert synth.generate(out, per_class=PER_CLASS, size=SIZE, seed=0) == out
    return out


@pytest.fixture(scope="module")
def index(tree: Path):
    return scan(tree)


def read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


def samples(cls: str, count: int, size: int = 64, seed: int = 0) -> list[synth.SyntheticCXR]:
    return [synth.synthesize(cls, n, size, seed) for n in range(1, count + 1)]


def lung_box(lung: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(lung)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def best_threshold_accuracy(positive: list[float], negative: list[float]) -> float:
    """Accuracy of the best single threshold on one feature, either direction."""
    values = np.array(positive + negative)
    truth = np.r_[np.ones(len(positive)), np.zeros(len(negative))].astype(bool)
    return max(max(((values >= t) == truth).mean(), ((values < t) == truth).mean()) for t in values)


# --------------------------------------------------------------------------- layout


def test_tree_scans_to_exact_counts_without_problems(index) -> None:
    assert index.problems == []
    assert set(index.subset_dirs) == set(SUBSETS)
    counts = index.counts()
    assert len(counts) == len(SUBSETS) * len(SPLITS) * len(CLASSES)
    assert set(counts.values()) == {PER_CLASS}
    for sample in index.select(subset="infection"):
        assert sample.infection_mask is not None and sample.infection_mask.is_file()
    for sample in index.select(subset="lung"):
        assert sample.infection_mask is None
        assert not (sample.image.parent.parent / INFECTION_MASKS_DIR).exists()


def test_file_names_follow_the_real_patterns_and_numbers_are_unique_per_class(index) -> None:
    for subset in SUBSETS:
        for cls in CLASSES:
            numbers = []
            for sample in index.select(subset=subset, cls=cls):
                match = NAME_PATTERNS[cls].fullmatch(sample.image.name)
                assert match, f"{sample.image.name!r} does not look like a real {cls} file"
                assert sample.lung_mask.name == sample.image.name
                numbers.append(int(match[1]))
            assert sorted(numbers) == list(range(1, 3 * PER_CLASS + 1))


def test_subsets_argument_writes_only_the_subsets_asked_for(tmp_path: Path) -> None:
    synth.generate(tmp_path, per_class=1, size=32, subsets=("lung",))
    assert (tmp_path / SUBSET_DIRS["lung"]).is_dir()
    assert not (tmp_path / SUBSET_DIRS["infection"]).exists()
    assert set(scan(tmp_path).counts().values()) == {1}


# --------------------------------------------------------------------------- file formats


def test_pngs_are_8_bit_single_channel_and_masks_binary(index) -> None:
    for sample in index:
        image = read(sample.image)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
        assert image.std() > 5  # a picture, not a constant
        masks = [sample.lung_mask] + ([sample.infection_mask] if sample.infection_mask else [])
        for path in masks:
            mask = read(path)
            assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) <= {0, 255}
        assert read(sample.lung_mask).any()


def test_infection_masks_only_for_covid_and_inside_the_lung(index) -> None:
    for sample in index.select(subset="infection"):
        infection = read(sample.infection_mask) > 0
        lung = read(sample.lung_mask) > 0
        if sample.cls == "COVID-19":
            assert infection.any(), sample.image
            assert not (infection & ~lung).any(), sample.image
        else:
            assert not infection.any(), sample.image


def test_same_name_is_the_same_image_in_both_subsets(index) -> None:
    lung = {(s.split, s.cls, s.id): s for s in index.select(subset="lung")}
    infection = {(s.split, s.cls, s.id): s for s in index.select(subset="infection")}
    assert lung.keys() == infection.keys()
    for key, a in lung.items():
        b = infection[key]
        assert a.image.read_bytes() == b.image.read_bytes()
        assert a.lung_mask.read_bytes() == b.lung_mask.read_bytes()


def test_images_within_a_tree_differ(index) -> None:
    images = [s.image.read_bytes() for s in index.select(subset="lung")]
    assert len(set(images)) == len(images)


# --------------------------------------------------------------------------- determinism


def test_same_arguments_give_byte_identical_trees(tree: Path, tmp_path: Path) -> None:
    again = synth.generate(tmp_path / "again", per_class=PER_CLASS, size=SIZE, seed=0)
    first, second = all_files(tree), all_files(again)
    assert len(first) == (2 + 3) * len(SPLITS) * len(CLASSES) * PER_CLASS
    assert first == second


def test_another_seed_gives_other_images(tree: Path, tmp_path: Path) -> None:
    other = synth.generate(tmp_path / "other", per_class=PER_CLASS, size=SIZE, seed=1)
    first, second = all_files(tree), all_files(other)
    assert first.keys() == second.keys()
    images = [name for name in first if f"/{IMAGES_DIR}/" in name]
    assert all(first[name] != second[name] for name in images)


# --------------------------------------------------------------------------- looks like a CXR


@pytest.mark.parametrize("cls", CLASSES)
def test_dark_lungs_in_a_brighter_body_on_a_dark_background(cls: str) -> None:
    for sample in samples(cls, 8):
        image = sample.image.astype(np.float32)
        lung = sample.lung_mask > 0
        rows, cols = lung_box(lung)
        box = np.zeros_like(lung)
        box[rows, cols] = True
        around = box & ~lung  # spine, heart, mediastinum and soft tissue beside the lungs
        size = lung.shape[0]
        abdomen = image[rows.stop + 2 : size - 2, cols].copy()  # soft tissue below the lungs
        spine = slice(abdomen.shape[1] // 2 - size // 10, abdomen.shape[1] // 2 + size // 10)
        abdomen[:, spine] = np.nan
        corners = np.concatenate([image[:6, :6].ravel(), image[:6, -6:].ravel()])
        assert 0.15 < lung.mean() < 0.6
        assert image[lung].mean() + 15 < image[around].mean()
        assert image[lung].mean() + 25 < np.nanmean(abdomen)
        assert corners.mean() + 30 < image[around].mean()
        # Two lung fields, left and right of the midline, with a gap for the mediastinum.
        columns = lung.any(axis=0)
        mid = lung.shape[1] // 2
        assert columns[: mid - 2].any() and columns[mid + 2 :].any()
        assert not columns[mid - 1 : mid + 1].any()


def test_covid_infection_is_brighter_than_the_rest_of_the_lung() -> None:
    for sample in samples("COVID-19", 12):
        image = sample.image.astype(np.float32)
        lung, infection = sample.lung_mask > 0, sample.infection_mask > 0
        assert image[infection].mean() > image[lung & ~infection].mean() + 8


def test_infected_share_of_the_lung_varies_like_mild_to_severe_disease() -> None:
    shares = [
        (s.infection_mask > 0).sum() / (s.lung_mask > 0).sum() for s in samples("COVID-19", 30)
    ]
    assert 0.0 < min(shares) < 0.12
    assert 0.3 < max(shares) < 0.8
    assert 0.1 < float(np.median(shares)) < 0.35


@pytest.mark.parametrize("size", [16, 32])
def test_tiny_images_keep_lungs_and_infection(size: int) -> None:
    for sample in samples("COVID-19", 10, size=size):
        lung, infection = sample.lung_mask > 0, sample.infection_mask > 0
        assert sample.image.shape == (size, size)
        assert 0.15 < lung.mean() < 0.6
        assert infection.any() and not (infection & ~lung).any()


def test_lungs_are_visible_to_an_intensity_threshold() -> None:
    """Otsu's threshold inside the lung's bounding box finds the lungs: they are in the pixels."""
    dices = []
    for cls in CLASSES:
        for sample in samples(cls, 10):
            lung = sample.lung_mask > 0
            box = lung_box(lung)
            crop = np.ascontiguousarray(sample.image[box])
            threshold, _ = cv2.threshold(crop, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            found = np.zeros_like(lung)
            found[box] = crop <= threshold
            dices.append(2 * (found & lung).sum() / (found.sum() + lung.sum()))
    assert min(dices) > 0.6
    assert np.mean(dices) > 0.85


def test_a_trivial_feature_tells_covid_from_normal() -> None:
    """Share of lung pixels brighter than the darker quarter of the tissue around the lungs."""

    def bright_share(sample: synth.SyntheticCXR) -> float:
        image = sample.image.astype(np.float32)
        lung = sample.lung_mask > 0
        box = np.zeros_like(lung)
        box[lung_box(lung)] = True
        level = np.percentile(image[box & ~lung], 25)
        return float((image[lung] > level).mean())

    covid = [bright_share(s) for s in samples("COVID-19", 25)]
    normal = [bright_share(s) for s in samples("Normal", 25)]
    non_covid = [bright_share(s) for s in samples("Non-COVID", 25)]
    assert best_threshold_accuracy(covid, normal) >= 0.88
    assert best_threshold_accuracy(non_covid, normal) >= 0.8


# --------------------------------------------------------------------------- ensure_synthetic


def test_ensure_synthetic_generates_once(tmp_path: Path) -> None:
    first = synth.ensure_synthetic(tmp_path, per_class=1, size=32, seed=3)
    marker = first / synth.MARKER
    assert json.loads(marker.read_text())["per_class"] == 1
    assert set(scan(first).counts().values()) == {1}
    image = next(first.rglob("*.png"))
    stamps = (marker.stat().st_mtime_ns, image.stat().st_mtime_ns)

    second = synth.ensure_synthetic(tmp_path, per_class=1, size=32, seed=3)
    assert second == first
    assert (marker.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

    other = synth.ensure_synthetic(tmp_path, per_class=1, size=32, seed=4)
    assert other != first and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, other.name]
    )


def test_ensure_synthetic_uses_the_tree_of_a_process_that_won_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = synth.ensure_synthetic(tmp_path / "cache", per_class=1, size=32)
    (winner / "sentinel").write_text("drawn by the other process")
    parked = tmp_path / "parked"
    os.rename(winner, parked)
    real_generate = synth.generate

    def generate_while_another_finishes(out, **kwargs):
        os.rename(parked, winner)  # the other process renames its tree into place meanwhile
        return real_generate(out, **kwargs)

    monkeypatch.setattr(synth, "generate", generate_while_another_finishes)
    assert synth.ensure_synthetic(tmp_path / "cache", per_class=1, size=32) == winner
    assert (winner / "sentinel").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [winner.name]


def test_ensure_synthetic_redraws_a_tree_without_its_marker(tmp_path: Path) -> None:
    tree = synth.ensure_synthetic(tmp_path, per_class=1, size=32)
    (tree / synth.MARKER).unlink()
    next(tree.rglob("*.png")).unlink()
    assert synth.ensure_synthetic(tmp_path, per_class=1, size=32) == tree
    assert (tree / synth.MARKER).is_file()
    index = scan(tree)
    assert index.problems == [] and set(index.counts().values()) == {1}
    assert [p.name for p in tmp_path.iterdir()] == [tree.name]


# --------------------------------------------------------------------------- arguments and CLI


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, "--per-class must be >= 1"),
        ({"per_class": 2.5}, "--per-class must be an integer"),
        ({"size": 8}, "--size must be >= 16"),
        ({"size": 100_000}, "--size must be <= "),
        ({"seed": -1}, "--seed must be >= 0"),
        ({"subsets": ("lungs",)}, "unknown subset 'lungs'"),
        ({"subsets": ()}, "subsets must name at least one"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_ensure_synthetic_and_synthesize_reject_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--per-class"):
        synth.ensure_synthetic(tmp_path, per_class=0)
    with pytest.raises(ValueError, match="unknown class 'covid'"):
        synth.synthesize("covid", 1)


def test_generate_refuses_to_mix_with_an_existing_tree(tmp_path: Path) -> None:
    synth.generate(tmp_path, per_class=1, size=32)
    with pytest.raises(FileExistsError, match=re.escape(SUBSET_DIRS["lung"]) + ".*--force"):
        synth.generate(tmp_path, per_class=2, size=32)
    synth.generate(tmp_path, per_class=2, size=32, overwrite=True)
    assert set(scan(tmp_path).counts().values()) == {2}  # replaced, not mixed


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    defaults = parser.parse_args([str(tmp_path / "d")])
    assert (defaults.per_class, defaults.size, defaults.seed) == (10, 256, 0)

    args = parser.parse_args([str(tmp_path / "out"), "--per-class", "1", "--size", "32"])
    assert synth.run(args) == 0
    printed = capsys.readouterr().out
    assert "9" in printed and str(tmp_path / "out") in printed
    assert set(scan(tmp_path / "out").counts().values()) == {1}
    assert (tmp_path / "out" / SUBSET_DIRS["lung"]).is_dir()

    again = parser.parse_args([str(tmp_path / "out"), "--per-class", "2", "--size", "32"])
    assert synth.run(again) == 2
    assert "--force" in capsys.readouterr().err
    assert synth.run(parser.parse_args([*map(str, [again.out, "--per-class", 2]), "--force"])) == 0
    assert set(scan(tmp_path / "out").counts().values()) == {2}

    bad = parser.parse_args([str(tmp_path / "bad"), "--size", "4"])
    assert synth.run(bad) == 2
    assert "--size must be >= 16" in capsys.readouterr().err
