"""Near-duplicates (``python -m covidqu.data duplicates``) and the grouped, stratified folds of
``data.num_folds``, on synthetic trees with planted near-copies, and a tiny 2-fold sweep."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from covidqu.data import duplicates
from covidqu.data.__main__ import main as data_main
from covidqu.data.datamodule import LungDataModule
from covidqu.data.folds import fold_split
from covidqu.data.layout import scan
from covidqu.data.synth import generate
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.report import main as report_main
from covidqu.runtime.checks import preflight

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics, run_module

#: Synthetic CXRs are smooth and alike: distinct ones are 34+ bits apart (real ones, where the
#: default 52 was chosen, spread far wider), so these tests pair at 16 bits.
DIST = "16"
LUNG = Path("Lung Segmentation Data") / "Lung Segmentation Data"


def _plant(root: Path, src: tuple[str, str, str], dst: tuple[str, str, str], how: str) -> str:
    """Copy the lung image ``src`` (split, class, name) with its mask to ``dst``, altered by
    ``how`` (noise: +-3 gray levels; resize: down to 80% and back): a near-duplicate."""
    image = cv2.imread(str(root / LUNG / src[0] / src[1] / "images" / src[2]), 0)
    if how == "noise":
        noise = np.random.default_rng(0).integers(-3, 4, image.shape)
        image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
    else:
        h, w = image.shape
        image = cv2.resize(cv2.resize(image, (w * 4 // 5, h * 4 // 5)), (w, h))
    out = root / LUNG / dst[0] / dst[1]
    cv2.imwrite(str(out / "images" / dst[2]), image)
    shutil.copy(root / LUNG / src[0] / src[1] / "lung masks" / src[2], out / "lung masks" / dst[2])
    return f"{LUNG.as_posix()}/{dst[0]}/{dst[1]}/images/{dst[2]}"


@pytest.fixture(scope="module")
def planted(module_tmp) -> tuple[Path, dict[str, str]]:
    """A synthetic tree (6 per split and class) with near-copies planted: a Train image in Test
    (a leak), one in Val and one within Train (for the folds)."""
    root = generate(module_tmp("dup") / "tree", per_class=6, size=48, seed=0)
    names = {
        "leak": _plant(
            root,
            ("Train", "COVID-19", "covid_1.png"),
            ("Test", "COVID-19", "covid_901.png"),
            "noise",
        ),
        "val": _plant(
            root,
            ("Train", "Normal", "Normal (2).png"),
            ("Val", "Normal", "Normal (902).png"),
            "resize",
        ),
        "train": _plant(
            root,
            ("Train", "Non-COVID", "non_COVID (3).png"),
            ("Train", "Non-COVID", "non_COVID (903).png"),
            "noise",
        ),
    }
    return root, names


def _pairs(report: dict, a: str, b: str) -> list[dict]:
    return [p for g in report["groups"] if (g["a"], g["b"]) == (a, b) for p in g["pairs"]]


def test_a_planted_near_copy_across_train_and_test_is_listed_and_exits_1(planted, tmp_path, capsys):
    root, names = planted
    cache = ["--cache-dir", str(tmp_path)]
    assert data_main(["duplicates", str(root), "--max-distance", DIST, "--json", *cache]) == 1
    report = json.loads(capsys.readouterr().out)
    leak = _pairs(report, "lung/train", "lung/test")
    assert [(p["a"], p["b"]) for p in leak] == [
        (f"{LUNG.as_posix()}/Train/COVID-19/images/covid_1.png", names["leak"])
    ]
    assert 0 < leak[0]["distance"] <= int(DIST)
    # the other plants, under their own split pairs, not leaks; nothing else in the lung subset
    assert [p["b"] for p in _pairs(report, "lung/train", "lung/val")] == [names["val"]]
    assert [p["b"] for p in _pairs(report, "lung/train", "lung/train")] == [names["train"]]
    lung = [g for g in report["groups"] if g["kind"] != "across_subsets" and "lung" in g["a"]]
    assert sum(g["count"] for g in lung) == 3
    assert [g["straddles"] for g in lung if g["b"] == "lung/test"] == [True]
    # the infection subset holds the same CXRs as the lung one: counted as across subsets, and
    # the copy in lung Test of an infection Train image straddles too
    across = _pairs(report, "lung/test", "infection/train")
    assert names["leak"] in {p["a"] for p in across}
    assert report["straddling"] == 2

    # the text form names the split pair and both files, and why it exits 1
    assert data_main(["duplicates", str(root), "--max-distance", DIST, *cache]) == 1
    text = capsys.readouterr().out
    block = text.split("lung Train – lung Test: 1 pairs")[1].split("\n")[1]
    assert "covid_1.png" in block and names["leak"] in block
    assert "LEAK: 2 pair(s) straddle" in text


def test_the_tree_without_the_plant_exits_0_and_hashes_are_cached(
    synth_root, tmp_path, capsys, monkeypatch
):
    args = ["duplicates", str(synth_root), "--max-distance", DIST, "--json"]
    assert data_main([*args, "--cache-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["straddling"] == 0
    assert [g for g in report["groups"] if g["kind"] != "across_subsets"] == []
    # each lung image is its infection twin (same name, same pixels): counted, none a leak
    twins = {(g["a"], g["b"]): g["count"] for g in report["groups"]}
    assert twins == {(f"lung/{s}", f"infection/{s}"): 9 for s in ("train", "val", "test")}

    def rehash(*a, **k):
        raise AssertionError("hashed again although the tree did not change")

    monkeypatch.setattr(duplicates, "hash_files", rehash)
    assert data_main([*args, "--cache-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == report


def _flip(row: np.ndarray, bits: int, offset: int) -> np.ndarray:
    """``row`` (4 uint64 words) with ``bits`` bits flipped, spread over all four words."""
    flat = np.unpackbits(row.view(np.uint8)).copy()
    where = (offset + np.arange(bits) * 5) % duplicates.HASH_BITS  # 5 is prime to 256: distinct
    flat[where] ^= 1
    return np.packbits(flat).view(np.uint64)


def test_near_pairs_include_exactly_max_distance_and_not_one_bit_more() -> None:
    """The limit is inclusive, as ``--max-distance`` documents: a pair ``max_distance`` bits apart
    is listed with its distance, one a bit further is not, across a block of comparisons too."""
    rng = np.random.default_rng(0)
    n = duplicates.BLOCK + 6  # the pairs straddle the first block of rows and the second
    hashes = rng.integers(0, 2**63, (n, 4), dtype=np.int64).astype(np.uint64)
    hashes[n - 2] = _flip(hashes[1], 52, 3)  # exactly at the default limit
    hashes[n - 1] = _flip(hashes[2], 53, 7)  # one bit beyond it
    # random rows are ~128 bits apart: no other pair comes near
    ii, jj, dd = duplicates.near_pairs(hashes, 52)
    assert list(zip(ii.tolist(), jj.tolist(), dd.tolist(), strict=True)) == [(1, n - 2, 52)]
    ii, jj, dd = duplicates.near_pairs(hashes, 53)
    assert sorted(zip(ii.tolist(), jj.tolist(), dd.tolist(), strict=True)) == [
        (1, n - 2, 52),
        (2, n - 1, 53),
    ]
    assert len(duplicates.near_pairs(hashes, 51)[0]) == 0
    # identical hashes pair at 0; a single differing bit does not
    same = np.stack([hashes[0], hashes[0], _flip(hashes[0], 1, 200)])
    assert [a.tolist() for a in duplicates.near_pairs(same, 0)] == [[0], [1], [0]]


def test_a_missing_root_or_a_bad_distance_exits_2(tmp_path, capsys):
    assert data_main(["duplicates", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert data_main(["duplicates", str(tmp_path), "--max-distance", "300"]) == 2
    assert "--max-distance 300" in capsys.readouterr().err


# --------------------------------------------------------------------------- folds


def _module(root: Path, cache_dir: Path, **kw) -> LungDataModule:
    return LungDataModule(
        root, image_size=32, num_workers=0, cache_dir=cache_dir, duplicate_distance=int(DIST), **kw
    )


@pytest.fixture(scope="module")
def fold_sets(planted, module_tmp) -> list[dict[str, list]]:
    root, _ = planted
    cache = module_tmp("fold-cache")
    out = []
    for k in range(3):
        dm = _module(root, cache, num_folds=3, fold=k)
        dm.prepare_data()
        out.append({s: dm.split_samples(s) for s in ("train", "val", "test")})
    return out


def test_folds_are_disjoint_cover_train_and_val_and_leave_test_alone(planted, fold_sets):
    root, _ = planted
    index = scan(root, subsets=["lung"])
    pool = {s.image for s in index.select(subset="lung", split="train")}
    pool |= {s.image for s in index.select(subset="lung", split="val")}
    official_test = [s.image for s in index.select(subset="lung", split="test")]
    vals = [[s.image for s in f["val"]] for f in fold_sets]
    assert sorted(p for v in vals for p in v) == sorted(pool)  # each image validated once
    for f in fold_sets:
        train, val = {s.image for s in f["train"]}, {s.image for s in f["val"]}
        assert not train & val and train | val == pool
        assert [s.image for s in f["test"]] == official_test


def test_folds_are_stratified_and_keep_near_copies_together(planted, fold_sets):
    _, names = planted
    pool = Counter(s.cls for s in fold_sets[0]["train"] + fold_sets[0]["val"])
    for f in fold_sets:
        per_class = Counter(s.cls for s in f["val"])
        for cls, n in pool.items():
            assert abs(per_class[cls] - n / 3) <= 1, (cls, per_class, pool)
    fold_of = {s.image.name: k for k, f in enumerate(fold_sets) for s in f["val"]}
    assert fold_of["Normal (2).png"] == fold_of[Path(names["val"]).name]
    assert fold_of["non_COVID (3).png"] == fold_of[Path(names["train"]).name]


def test_folds_are_deterministic_and_independent_of_listing_order(planted, fold_sets, tmp_path):
    root, _ = planted
    dm = _module(root, tmp_path, num_folds=3, fold=1)  # a fresh process's view: new hashes too
    assert dm.split_samples("val") == fold_sets[1]["val"]
    index = scan(root, subsets=["lung"])
    pool = index.select(subset="lung", split="train") + index.select(subset="lung", split="val")
    hashes = duplicates.subset_hashes(index, "lung", pool)
    back = fold_split(pool[::-1], hashes[::-1], 3, 1, max_distance=int(DIST))
    assert back["val"] == fold_sets[1]["val"]
    other = fold_split(pool, hashes, 3, 1, seed=1, max_distance=int(DIST))
    assert other["val"] != fold_sets[1]["val"]  # the seed key does pick other folds


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"fold": 0}, "data.fold=0 is set but data.num_folds is null"),
        ({"num_folds": 1, "fold": 0}, "data.num_folds=1 must be an integer >= 2"),
        ({"num_folds": 3}, "data.num_folds=3 needs data.fold"),
        ({"num_folds": 3, "fold": 3}, "data.fold=3 is out of range for data.num_folds=3"),
        ({"num_folds": 3, "fold": -1}, "data.fold=-1 is out of range"),
    ],
)
def test_bad_fold_keys_are_refused_naming_the_key(tmp_path, keys, named):
    with pytest.raises(ConfigError, match=named):
        _module(tmp_path, tmp_path, **keys)


def test_more_folds_than_a_class_has_groups_is_refused_before_training(synth_root, tmp_path):
    dm = _module(synth_root, tmp_path, num_folds=7, fold=0)  # 6 images per class in Train+Val
    with pytest.raises(ConfigError, match=r"data\.num_folds=7: a class of Train"):
        dm.prepare_data()


def test_folds_select_rows_of_the_packed_cache(planted, fold_sets, tmp_path):
    root, _ = planted
    dm = _module(root, tmp_path, num_folds=3, fold=2, cache="packed")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.datasets["val"].samples == fold_sets[2]["val"]
    assert next(iter(dm.val_dataloader()))["image"].shape[-2:] == (32, 32)


# --------------------------------------------------------------------------- a 2-fold sweep


def test_a_two_fold_sweep_records_its_folds_and_the_report_gives_mean_and_std(
    synth_root, module_tmp
):
    out = module_tmp("folds") / "sweep"
    proc = run_module(
        "covidqu.train",
        [
            "-m",
            *TINY,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "callbacks.early_stopping=null",
            "logger=csv",
            "test=false",
            f"data.root={synth_root}",
            f"hydra.sweep.dir={out}",
            "data.num_folds=2",
            f"data.duplicate_distance={DIST}",
            "data.fold=0,1",
        ],
        env={"PROJECT_ROOT": str(out.parent / "project"), "COVIDQU_CACHE": str(out.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in out.iterdir() if p.name.isdigit())
    metrics = [read_metrics(j) for j in jobs]
    assert [(m["num_folds"], m["fold"]) for m in metrics] == [(2, 0), (2, 1)]
    config = yaml.safe_load((jobs[0] / ".hydra" / "config.yaml").read_text())
    assert config["data"]["num_folds"] == 2

    assert report_main([str(out), "--quiet"]) == 0
    rows = read_csv(out / "report.csv")
    assert [r["fold"] for r in rows[:2]] in (["0", "1"], ["1", "0"])
    mean, std = (next(r for r in rows if r["fold"] == s) for s in ("mean", "std"))
    for key in ("val/dice", "val/loss"):
        a, b = (m[key] for m in metrics)
        assert float(mean[key]) == pytest.approx((a + b) / 2, rel=1e-3, abs=1e-4)
        assert float(std[key]) == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-3, abs=1e-4)
    assert "data.fold" not in rows[0]  # the fold column says it, once

    # eval of a fold's checkpoint: split=val is the fold it validated on, not the official Val
    best = [j / m["best_checkpoint"] for j, m in zip(jobs, metrics, strict=True)]
    ev = out.parent / "eval"
    common = [f"data.root={synth_root}", f"data.cache_dir={out.parent}", "data.num_workers=0"]
    scored = evaluate(compose_config("eval", [f"ckpt_path={best[1]}", "split=val", *common], ev))
    fold = _module(synth_root, out.parent, num_folds=2, fold=1).split_samples("val")
    assert {r["id"] for r in read_csv(ev / "per_image.csv")} == {s.id for s in fold}
    assert (scored["num_folds"], scored["fold"]) == (2, 1)
    # an ensemble of both folds has no held-out Val: refused before anything is read
    both = f"ckpt_path=[{best[0]},{best[1]}]"
    cfg = compose_config("eval", [both, "split=val", *common], out.parent / "eval-both")
    with pytest.raises(ConfigError, match=r"split=val: the members of ckpt_path were validated"):
        preflight(cfg, "eval", out.parent / "eval-both", [])
    preflight(
        compose_config("eval", [both, *common], out.parent / "eval-both"),
        "eval",
        out.parent / "eval-both",
        [],
    )


def test_fold_settings_tell_the_official_splits_from_folds():
    from covidqu.eval.split import fold_settings

    official = {"num_folds": None, "fold": None, "fold_seed": 0}  # as a run without folds records
    older = {}  # a checkpoint from before folds were recorded
    fold = {"num_folds": 2, "fold": 1, "fold_seed": 0, "duplicate_distance": 16}
    assert fold_settings([official, older], "val") == {}  # the same split: the official Val
    assert fold_settings([fold, dict(fold)], "val") == fold
    assert fold_settings([fold, official], "test") == {}
    with pytest.raises(ConfigError, match=r"\(fold 1 of 2, the official Val\)"):
        fold_settings([fold, official], "train")
