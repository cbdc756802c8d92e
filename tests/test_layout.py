"""Layout discovery and the index, on synthetic trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from covidqu.constants import CLASSES, SPLITS
from covidqu.data.layout import (
    INFECTION_MASKS_DIR,
    LUNG_MASKS_DIR,
    OFFICIAL_COUNTS,
    SUBSET_DIRS,
    DataError,
    NotADatasetError,
    resolve_root,
    scan,
)

from conftest import SYNTH_PER_CLASS


def inner(root: Path, subset: str) -> Path:
    return root / SUBSET_DIRS[subset] / SUBSET_DIRS[subset]


def test_official_counts_add_up_to_the_published_totals():
    lung = sum(v for (s, _, _), v in OFFICIAL_COUNTS.items() if s == "lung")
    infection = sum(v for (s, _, _), v in OFFICIAL_COUNTS.items() if s == "infection")
    assert (lung, infection) == (33_920, 5_826)
    per_split = {
        split: sum(v for (s, sp, _), v in OFFICIAL_COUNTS.items() if s == "lung" and sp == split)
        for split in SPLITS
    }
    assert per_split == {"train": 21_715, "val": 5_417, "test": 6_788}
    covid = sum(v for (s, _, c), v in OFFICIAL_COUNTS.items() if s == "lung" and c == "COVID-19")
    assert covid == 11_956
    inf_test = sum(
        v for (s, sp, _), v in OFFICIAL_COUNTS.items() if (s, sp) == ("infection", "test")
    )
    assert inf_test == 1_166


def test_index_of_a_synthetic_tree(synth_root: Path):
    index = scan(synth_root)
    assert set(index.subset_dirs) == {"lung", "infection"}
    assert index.problems == []
    assert len(index) == 2 * len(SPLITS) * len(CLASSES) * SYNTH_PER_CLASS
    assert set(index.counts().values()) == {SYNTH_PER_CLASS}
    for s in index:
        assert s.image.is_file() and s.lung_mask.is_file()
        assert s.image.name == s.lung_mask.name
        assert s.image.parent.parent.name == s.cls
        assert s.label == CLASSES.index(s.cls)
        assert s.id == s.image.stem
        if s.subset == "infection":
            assert s.infection_mask is not None and s.infection_mask.name == s.image.name
            assert s.infection_mask.parent.name == INFECTION_MASKS_DIR
        else:
            assert s.infection_mask is None
        assert s.lung_mask.parent.name == LUNG_MASKS_DIR


@pytest.mark.parametrize("form", ["archive", "subset folder", "inner folder"])
@pytest.mark.parametrize("subset", ["lung", "infection"])
def test_three_root_forms_resolve(synth_root: Path, form: str, subset: str):
    given = {
        "archive": synth_root,
        "subset folder": synth_root / SUBSET_DIRS[subset],
        "inner folder": inner(synth_root, subset),
    }[form]
    dirs = resolve_root(given)
    assert dirs[subset] == inner(synth_root, subset)
    index = scan(given, subsets=[subset])
    assert len(index) == len(SPLITS) * len(CLASSES) * SYNTH_PER_CLASS
    assert {s.subset for s in index} == {subset}


def test_inner_folder_renamed_is_recognised_by_its_content(synth_copy: Path, tmp_path: Path):
    moved = tmp_path / "my infection data"
    shutil.move(inner(synth_copy, "infection"), moved)
    assert resolve_root(moved) == {"infection": moved}


def test_subset_folder_without_the_repeated_inner_folder(synth_copy: Path, tmp_path: Path):
    flat = tmp_path / SUBSET_DIRS["lung"]
    shutil.move(inner(synth_copy, "lung"), flat)
    assert resolve_root(flat) == {"lung": flat}


def test_class_comes_from_the_folder_not_the_file_name(synth_copy: Path):
    folder = inner(synth_copy, "lung") / "Train" / "Non-COVID"
    src = sorted((folder / "images").iterdir())[0]
    new_name = src.name.replace("non_COVID", "Non_COVID")
    for sub in ("images", LUNG_MASKS_DIR):
        (folder / sub / src.name).rename(folder / sub / new_name)
    index = scan(synth_copy, subsets=["lung"])
    renamed = [s for s in index if s.image.name == new_name]
    assert len(renamed) == 1 and renamed[0].cls == "Non-COVID" and renamed[0].label == 1
    assert index.problems == []


def test_a_file_named_for_another_class_takes_its_folders_class(synth_copy: Path):
    """``covid_99.png`` under ``Normal/images`` is a Normal image, everywhere it is read.

    Lung subset: a Normal image renamed. Infection subset: a COVID-19 image (with its infection
    mask) moved, name and all, into the Normal folder. A name is not a problem (the real data
    has misnamed files, such as 41 ``Non_COVID (n).png``), but the pixel check then judges the
    moved file as the Normal image its folder makes it, and flags its infection mask.
    """
    from covidqu.data.datamodule import InfectionDataModule, LungDataModule
    from covidqu.data.inspection import inspect_tree

    name = "covid_99.png"
    lung_normal = inner(synth_copy, "lung") / "Train" / "Normal"
    src = sorted((lung_normal / "images").iterdir())[0]
    for sub in ("images", LUNG_MASKS_DIR):
        (lung_normal / sub / src.name).rename(lung_normal / sub / name)
    inf_train = inner(synth_copy, "infection") / "Train"
    src = sorted((inf_train / "COVID-19" / "images").iterdir())[0]
    for sub in ("images", LUNG_MASKS_DIR, INFECTION_MASKS_DIR):
        (inf_train / "COVID-19" / sub / src.name).rename(inf_train / "Normal" / sub / name)

    index = scan(synth_copy)
    moved = {s.subset: s for s in index if s.image.name == name}
    assert {k: (s.split, s.cls, s.label) for k, s in moved.items()} == {
        "lung": ("train", "Normal", 2),
        "infection": ("train", "Normal", 2),
    }
    assert index.problems == []
    counts = index.counts()
    assert counts["lung/train/Normal"] == counts["lung/train/COVID-19"] == SYNTH_PER_CLASS
    assert counts["infection/train/Normal"] == SYNTH_PER_CLASS + 1
    assert counts["infection/train/COVID-19"] == SYNTH_PER_CLASS - 1

    for cls in (LungDataModule, InfectionDataModule):
        dm = cls(root=synth_copy, image_size=32, num_workers=0)
        dm.setup("fit")
        ds = dm.datasets["train"]
        i = next(i for i, s in enumerate(ds.samples) if s.id == "covid_99")
        assert (ds.labels[i], ds[i]["label"]) == (2, 2), cls.__name__

    report = inspect_tree(synth_copy, check_pixels=True, workers=1)
    assert report["counts"] == counts
    moved_mask = (inf_train / "Normal" / INFECTION_MASKS_DIR / name).relative_to(synth_copy)
    assert report["problems"] == [
        {
            "path": moved_mask.as_posix(),
            "problem": "infection mask of a Normal image is not empty "
            "(only COVID-19 images carry infection)",
        }
    ]


def test_names_with_spaces_and_parentheses_pair(synth_root: Path):
    index = scan(synth_root)
    normal = [s for s in index if s.cls == "Normal"]
    assert normal and all(" (" in s.image.name and s.image.name.endswith(").png") for s in normal)


def test_ids_are_in_natural_order(synth_root: Path):
    ids = [s.id for s in scan(synth_root).select("lung", "train", "COVID-19")]
    numbers = [int(i.split("_")[1]) for i in ids]
    assert numbers == sorted(numbers)


def test_select_filters(synth_root: Path):
    index = scan(synth_root)
    picked = index.select(subset="infection", split="val", cls=["COVID-19", "Normal"])
    assert len(picked) == 2 * SYNTH_PER_CLASS
    assert {(s.subset, s.split) for s in picked} == {("infection", "val")}
    assert {s.cls for s in picked} == {"COVID-19", "Normal"}


def test_missing_root_says_how_to_fix(tmp_path: Path):
    with pytest.raises(NotADatasetError, match=r"does not exist.*data\.root.*COVIDQU_ROOT"):
        resolve_root(tmp_path / "nowhere")


def test_wrong_root_says_what_it_expected_and_found(tmp_path: Path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADatasetError) as err:
        resolve_root(tmp_path)
    msg = str(err.value)
    assert "Lung Segmentation Data" in msg and "Infection Segmentation Data" in msg
    assert "photos/" in msg and "notes.txt" in msg


def test_asking_for_a_subset_that_is_absent(synth_copy: Path):
    shutil.rmtree(synth_copy / SUBSET_DIRS["infection"])
    with pytest.raises(DataError, match="no 'Infection Segmentation Data' under data root"):
        scan(synth_copy, subsets=["infection"])


def test_orphans_are_problems_and_left_out(synth_copy: Path):
    folder = inner(synth_copy, "infection") / "Train" / "COVID-19"
    images = sorted((folder / "images").iterdir())
    (folder / INFECTION_MASKS_DIR / images[0].name).unlink()  # image without its mask
    images[1].unlink()  # masks without their image
    index = scan(synth_copy, subsets=["infection"])
    assert index.counts()["infection/train/COVID-19"] == SYNTH_PER_CLASS - 2
    named = {p.path.name: p.problem for p in index.problems}
    assert "has no mask in 'infection masks'" in named[images[0].name]
    assert "mask has no image" in named[images[1].name]
    assert len(index.problems) == 3  # one orphan image, two orphan masks
    with pytest.raises(DataError) as err:
        index.raise_on_problems()
    assert images[0].name in str(err.value) and "inspect" in str(err.value)


def test_misnamed_folders_and_stray_files_are_problems(synth_copy: Path):
    train = inner(synth_copy, "lung") / "Train"
    (train / "Normal").rename(train / "normal")  # wrong case: the class would vanish silently
    (train / "COVID-19" / "images" / "Thumbs.db").write_bytes(b"x")
    (train / "COVID-19" / "images" / "covid_99.jpg").write_bytes(b"x")
    (train / "COVID-19" / "images" / ".DS_Store").write_bytes(b"x")  # hidden: ignored
    (inner(synth_copy, "lung") / "Testing").mkdir()
    index = scan(synth_copy, subsets=["lung"])
    problems = {p.path.relative_to(synth_copy).as_posix(): p.problem for p in index.problems}
    base = f"{SUBSET_DIRS['lung']}/{SUBSET_DIRS['lung']}"
    stray = "unexpected file (only .png files belong here)"
    assert problems == {
        f"{base}/Train/normal": problems[f"{base}/Train/normal"],
        f"{base}/Train/Normal": "missing class folder",
        f"{base}/Train/COVID-19/images/Thumbs.db": stray,
        f"{base}/Train/COVID-19/images/covid_99.jpg": stray,
        f"{base}/Testing": problems[f"{base}/Testing"],
    }
    assert "unexpected folder 'normal'" in problems[f"{base}/Train/normal"]
    assert "Normal" in problems[f"{base}/Train/normal"]
    assert "Test, Train, Val" in problems[f"{base}/Testing"]
    assert index.counts()["lung/train/COVID-19"] == SYNTH_PER_CLASS  # the PNGs still count


def test_a_copy_without_a_test_split_is_fine(synth_copy: Path):
    for subset in ("lung", "infection"):
        shutil.rmtree(inner(synth_copy, subset) / "Test")
    index = scan(synth_copy)
    assert index.problems == []
    assert index.counts()["infection/test/Normal"] == 0
