"""Evaluation and prediction from saved checkpoints, through the real entry points."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from covidqu.eval.run import evaluate
from covidqu.models.checkpoint import CheckpointError, load_module
from covidqu.predict.run import predict
from covidqu.report.gallery import worst

from pipeline_helpers import compose_config, read_csv, read_metrics, run_module


@pytest.fixture(scope="module")
def lung_run(trained_run: Callable[[str], Path]) -> Path:
    """A run folder with checkpoints of a tiny lung model (32 px; shared, read-only)."""
    return trained_run("lung")


@pytest.fixture(scope="module")
def classify_run(trained_run: Callable[[str], Path]) -> Path:
    """A run folder of a tiny classifier (shared, read-only)."""
    return trained_run("classify")


def test_checkpoint_is_self_contained(lung_run: Path):
    module = load_module(lung_run / "checkpoints" / "best.ckpt")
    pre = module.recipe["preprocess"]
    assert pre["image_size"] == 32 and pre["target"] == "lung" and pre["subset"] == "lung"
    assert not module.training
    out = module(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    # the same weights as training left: the loaded network predicts identically
    ckpt = torch.load(lung_run / "checkpoints" / "best.ckpt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("net."))
    assert torch.equal(module.state_dict()[key], ckpt["state_dict"][key])


def test_eval_writes_metrics_per_image_rows_and_overlays(lung_run: Path, synth_root, tmp_path):
    out = tmp_path / "eval"
    proc = run_module(
        "covidqu.eval",
        [
            f"ckpt_path={lung_run / 'checkpoints' / 'best.ckpt'}",
            f"data.root={synth_root}",
            "num_overlays=3",
            "num_worst=2",
            "data.num_workers=0",
            f"hydra.run.dir={out}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    trained = read_metrics(lung_run)
    assert metrics["test/dice"] == pytest.approx(trained["test/dice"], abs=1e-5)
    assert metrics["images"] == 9 and metrics["split"] == "test"
    # the headline figures are printed, then the folder that holds them all
    said = proc.stdout + proc.stderr
    assert f"test/dice {metrics['test/dice']:.4f}" in said
    assert f"test/iou {metrics['test/iou']:.4f}" in said
    assert said.index("test/dice ") < said.index(f"outputs in {out}")
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 9
    assert {r["class"] for r in rows} == {"COVID-19", "Non-COVID", "Normal"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    # the per-image means of metrics.json are the means of per_image.csv's rows (the masks
    # after the checkpoint's post-processing; the network's own: test/dice_image)
    for key in ("dice", "iou"):
        mean = sum(float(r[key]) for r in rows) / len(rows)
        assert metrics[f"test/{key}_image_post"] == pytest.approx(mean, abs=1e-5)
    assert "test/dice_covid" not in metrics  # lung masks: every image shows a lung
    # the split's first 3 images and its 2 worst, as the report's gallery ranks them: the
    # gallery finds an overlay for each image it shows
    _, shown = worst(out, 2)
    kept = {r["id"] for r in rows[:3]} | {w.name for w in shown}
    overlays = sorted((out / "overlays").iterdir())
    assert {p.stem for p in overlays} == kept and len(kept) > 3
    assert all(w.overlay is not None for w in shown)
    panel = cv2.imread(str(overlays[0]))
    assert panel.shape[1] == 3 * 256  # image | truth | prediction, enlarged from 32 px


def test_eval_on_val_and_refusing_preprocessing_overrides(lung_run: Path, synth_root, tmp_path):
    ckpt = lung_run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={ckpt}", f"data.root={synth_root}", "split=val", "num_overlays=0"]
    evaluate(compose_config("eval", [*args, "data.num_workers=0"], tmp_path / "val"))
    assert read_metrics(tmp_path / "val")["val/dice"] == pytest.approx(
        read_metrics(lung_run)["val/dice"], abs=1e-5
    )
    # size and normalisation come from the checkpoint: the eval config does not offer them
    proc = run_module(
        "covidqu.eval",
        [f"ckpt_path={ckpt}", "data.image_size=64", f"hydra.run.dir={tmp_path / 'bad'}"],
    )
    assert proc.returncode != 0
    assert "image_size" in proc.stderr


def test_eval_of_a_missing_or_foreign_checkpoint(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        load_module(tmp_path / "none.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not written by a covidqu run"):
        load_module(foreign)


def _inputs(folder: Path, sample_image: np.ndarray) -> dict[str, tuple[int, int] | None]:
    """Images of every kind predict must take, and a broken one; name -> (h, w) or None."""
    folder.mkdir()
    cv2.imwrite(str(folder / "gray8.png"), sample_image)
    big16 = cv2.resize(sample_image, (300, 200)).astype(np.uint16) * 257
    cv2.imwrite(str(folder / "gray16.png"), big16)
    rgb = cv2.cvtColor(cv2.resize(sample_image, (97, 131)), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(folder / "colour.jpg"), rgb)
    rgba = cv2.cvtColor(sample_image, cv2.COLOR_GRAY2BGRA)
    cv2.imwrite(str(folder / "alpha.png"), rgba)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "notes.txt").write_text("not an image")
    return {
        "gray8": sample_image.shape,
        "gray16": (200, 300),
        "colour": (131, 97),
        "alpha": sample_image.shape,
        "broken": None,
    }


def test_predict_any_image_at_its_own_size(lung_run: Path, synth_root: Path, tmp_path: Path):
    image = cv2.imread(str(sorted(synth_root.rglob("images/*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    expected = _inputs(tmp_path / "in", image)
    out = tmp_path / "out"
    proc = run_module(
        "covidqu.predict",
        [
            f"ckpt_path={lung_run / 'checkpoints' / 'best.ckpt'}",
            f"input={tmp_path / 'in'}",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["file"]).stem: r for r in read_csv(out / "predictions.csv")}
    assert set(rows) == set(expected)  # the text file is not an image input
    assert rows["broken"]["status"].startswith("error:")
    assert "skipped" in proc.stdout + proc.stderr and "broken.png" in proc.stdout + proc.stderr
    for name, shape in expected.items():
        if shape is None:
            assert not (out / f"{name}_mask.png").exists()
            continue
        assert rows[name]["status"] == "ok"
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == tuple(shape[:2]) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert float(rows[name]["area_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-6)
        assert cv2.imread(str(out / f"{name}_overlay.png")).shape[:2] == shape[:2]


def test_predict_on_real_sample_images(lung_run: Path, sample_root: Path, tmp_path: Path):
    folder = sample_root / "Lung Segmentation Data" / "Lung Segmentation Data" / "Test" / "Normal"
    rows = predict(lung_run / "checkpoints" / "best.ckpt", folder / "images", tmp_path)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        mask = cv2.imread(str(tmp_path / f"{Path(r['file']).stem}_mask.png"), 0)
        assert mask.shape == (256, 256)


def test_predict_with_a_classifier(classify_run: Path, synth_root: Path, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted(synth_root.rglob("Test/*/images/*.png"))[:3]:
        shutil.copy(src, folder / src.name)
    rows = predict(classify_run / "checkpoints" / "best.ckpt", folder, tmp_path / "out")
    assert len(rows) == 3
    for r in rows:
        probs = [r["p_COVID-19"], r["p_Non-COVID"], r["p_Normal"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == ["COVID-19", "Non-COVID", "Normal"][int(np.argmax(probs))]
    assert len(list((tmp_path / "out").glob("*_overlay.png"))) == 3


class _HalfAtThreshold(torch.nn.Module):
    """Logits of exactly 0 (probability 0.5) on the left half, slightly above on the right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[..., x.shape[-1] // 2 :] = 0.01
        return out


def test_predict_leaves_a_probability_at_the_threshold_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The rule is probability > threshold, as in evaluation: 0.5 is background."""
    from covidqu.models.metrics import SegmentationMetrics
    from covidqu.models.segmentation import SegmentationModule

    module = SegmentationModule(
        net=_HalfAtThreshold(),
        loss=None,
        metrics=SegmentationMetrics(),
        threshold=0.5,
        recipe={
            "task": {"kind": "segmentation"},
            "preprocess": {"image_size": 32, "mean": 0.449, "std": 0.226},
        },
    ).eval()
    monkeypatch.setattr("covidqu.predict.run.load_model", lambda path, map_location="cpu": module)
    cv2.imwrite(str(tmp_path / "cxr.png"), np.full((40, 48), 120, np.uint8))
    rows = predict(tmp_path / "model.ckpt", tmp_path / "cxr.png", tmp_path / "out")
    mask = cv2.imread(str(tmp_path / "out" / "cxr_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (40, 48)
    # the left part's probability is exactly 0.5 (bilinear between values of 0.5)
    assert int(mask[:, :20].max()) == 0, "pixels at probability 0.5 were counted positive"
    assert int(mask[:, 28:].min()) == 255
    assert 0.4 < rows[0]["area_fraction"] < 0.6


def test_predict_needs_its_arguments(tmp_path: Path):
    proc = run_module("covidqu.predict", [f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0 and "ckpt_path is required" in proc.stderr


def test_predict_prepares_images_exactly_as_evaluation(lung_run: Path, tmp_path: Path):
    """An odd-sized file through predict and through an evaluation dataset: the same mask."""
    from covidqu.data.datasets import CXRDataset
    from covidqu.data.layout import Sample
    from covidqu.data.transforms import build_transform

    ckpt = lung_run / "checkpoints" / "best.ckpt"
    module = load_module(ckpt)
    pre = module.recipe["preprocess"]
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (30, 70), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(tmp_path / "odd.png"), image)  # one side grows, the other shrinks
    cv2.imwrite(str(tmp_path / "odd_mask.png"), np.zeros_like(image))
    sample = Sample(
        "lung", "test", "Normal", "odd", tmp_path / "odd.png", tmp_path / "odd_mask.png"
    )
    ds = CXRDataset(
        [sample], transform=build_transform(pre["image_size"]), mean=pre["mean"], std=pre["std"]
    )
    with torch.inference_mode():
        probs = module.probabilities(module(ds[0]["image"][None]))[0, 0].numpy()
    expected = cv2.resize(probs, (70, 30), interpolation=cv2.INTER_LINEAR) > module.threshold
    predict(ckpt, tmp_path / "odd.png", tmp_path / "out", postprocess={"mode": "fixed"})
    mask = cv2.imread(str(tmp_path / "out" / "odd_mask.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask > 0, expected)
