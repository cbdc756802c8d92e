"""eval and analyze on two DDP processes give the files of one process: each image once.

The synthetic tree has 9 images per split (odd): two processes hold 5 and 4, so a sampler that
pads the shards (PyTorch's DistributedSampler) would count one image twice, and one that drops
the remainder would lose one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidqu.analyze import run as analysis
from covidqu.analyze.run import analyze
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.report.gallery import worst

from pipeline_helpers import compose_config, read_csv, read_metrics, run_module

DDP_CPU = ["trainer=ddp_cpu", "trainer.devices=2", "trainer.enable_progress_bar=false"]
#: Figures that depend on how the images are batched (a Dice loss pools each batch's pixels),
#: so they differ between any two batchings, one process or several alike.
BATCH_FIGURES = ("loss",)
IGNORED = {"world_size", "duration_s"}


@pytest.fixture(scope="module")
def multiclass_ckpt(trained_run: Callable[[str], Path]) -> Path:
    """One tiny infection_multiclass model (shared, read-only): evaluated as is, and both
    stages of analyze. The figures need only differ from image to image, not be good."""
    return trained_run("infection_multiclass") / "checkpoints" / "best.ckpt"


def assert_same_figures(single: dict, ddp: dict) -> None:
    keys = {k for k in single if k not in IGNORED}
    assert keys == {k for k in ddp if k not in IGNORED}
    for key in sorted(keys):
        if key.rsplit("/", 1)[-1].startswith(BATCH_FIGURES):
            continue
        a, b = single[key], ddp[key]
        if isinstance(a, float) or isinstance(b, float):
            assert a is not None and b is not None, key
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (key, a, b)
        else:
            assert a == b, key


def assert_same_rows(single: list[dict], ddp: list[dict]) -> None:
    """The same rows in the same order; numbers equal within float tolerance."""
    assert len(single) == len(ddp)
    for a, b in zip(single, ddp, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            try:
                x, y = float(a[key]), float(b[key])
            except ValueError:
                assert a[key] == b[key], key
            else:
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (key, a, b)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))}


def assert_same_pictures(single: Path, ddp: Path) -> None:
    a, b = pngs(single), pngs(ddp)
    assert a, f"no pictures in {single}"
    assert sorted(a) == sorted(b)
    for name in a:  # the same predictions drawn the same way
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name


def test_eval_on_two_processes_counts_every_image_once(multiclass_ckpt, synth_root, tmp_path):
    common = [f"ckpt_path={multiclass_ckpt}", f"data.root={synth_root}", "data.num_workers=0"]
    common += ["data.batch_size=2", "num_overlays=2", "num_worst=4"]
    one = tmp_path / "single"
    evaluate(compose_config("eval", [*common, "trainer.enable_progress_bar=false"], one))
    two = tmp_path / "ddp"
    proc = run_module("covidqu.eval", [*common, *DDP_CPU, f"hydra.run.dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    single, ddp = read_metrics(one), read_metrics(two)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert single["images"] == ddp["images"] == 9
    assert "test/dice_covid" in ddp  # the per-image sums are synced too, not only pixel counts
    assert_same_figures(single, ddp)
    rows = read_csv(two / "per_image.csv")
    assert len({r["id"] for r in rows}) == 9
    assert_same_rows(read_csv(one / "per_image.csv"), rows)
    # the overlays of the split's first 2 images and of its 4 worst, whichever process held them
    first = {f"{r['id']}.png" for r in rows[:2]}
    worst_four = {f"{w.name}.png" for w in worst(two, 4)[1]}
    assert set(pngs(two / "overlays")) == first | worst_four and len(first | worst_four) > 2
    assert_same_pictures(one / "overlays", two / "overlays")
    # the second process ran this job, in this job's folder, and wrote none of the shared files
    assert (two / "eval_ddp_process_1.log").is_file()


def test_analyze_a_split_on_two_processes(multiclass_ckpt, synth_root, tmp_path):
    """Scoring test tunes the threshold on val first: both passes are sharded and gathered."""
    common = [f"infection_ckpt={multiclass_ckpt}", f"data.root={synth_root}", "split=test"]
    common += ["batch_size=2", "detect.n_boot=50"]
    one = tmp_path / "single"
    analyze(compose_config("analyze", [*common, "trainer.enable_progress_bar=false"], one))
    two = tmp_path / "ddp"
    proc = run_module("covidqu.analyze", [*common, *DDP_CPU, f"hydra.run.dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    single, ddp = read_metrics(one), read_metrics(two)
    assert ddp["world_size"] == 2 and ddp["detect/threshold_source"] == "val"
    assert single["images"] == ddp["images"] == 9
    assert_same_figures(single, ddp)
    rows = read_csv(two / analysis.ANALYSIS_FILE)
    assert len({r["id"] for r in rows}) == 9
    assert_same_rows(read_csv(one / analysis.ANALYSIS_FILE), rows)
    assert_same_pictures(one, two)  # masks and overlays of each image, and the plots


@pytest.mark.slow  # the split case above runs the same sharded stages
def test_analyze_files_on_two_processes(multiclass_ckpt, synth_root, tmp_path):
    folder = synth_root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Val"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(folder.glob("*/images/*.png"))[:6]:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(inputs / path.name), cv2.resize(image, (40, 30)))
    (inputs / "broken.png").write_bytes(b"not a png")  # 7 files, one unreadable
    common = [f"infection_ckpt={multiclass_ckpt}", f"input={inputs}", "batch_size=2"]
    one = tmp_path / "single"
    analyze(compose_config("analyze", [*common, "trainer.enable_progress_bar=false"], one))
    two = tmp_path / "ddp"
    proc = run_module("covidqu.analyze", [*common, *DDP_CPU, f"hydra.run.dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = read_csv(two / analysis.ANALYSIS_FILE)
    assert [Path(r["file"]).name for r in rows] == sorted(p.name for p in inputs.iterdir())
    assert [r["status"] != "ok" for r in rows].count(True) == 1
    assert_same_rows(read_csv(one / analysis.ANALYSIS_FILE), rows)
    assert len(pngs(two)) == 6 * 3  # lung mask, infection mask and overlay of each image
    assert_same_pictures(one, two)


def test_one_device_by_default_and_the_older_device_key(tmp_path):
    for name in ("eval", "analyze"):
        trainer = compose_config(name, ["ckpt_path=x"] if name == "eval" else [], tmp_path).trainer
        assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == ("auto", 1, 1), name
    # analyze's device=... names one device, in place of the trainer group
    cfg = compose_config("analyze", ["trainer=ddp_cpu", "device=cuda:1"], tmp_path)
    trainer = analysis.trainer_config(cfg)
    assert (trainer.accelerator, list(trainer.devices), trainer.strategy) == ("gpu", [1], "auto")
    cfg = compose_config("analyze", ["trainer=ddp_cpu"], tmp_path)  # device=auto: the group's
    assert analysis.trainer_config(cfg).devices == 2
    with pytest.raises(ConfigError, match=r"device=gpu0 .*cuda:N"):
        analysis.trainer_config(compose_config("analyze", ["device=gpu0"], tmp_path))
