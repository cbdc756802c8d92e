"""``task=multitask``: one network segments the infection and classifies the image.

One tiny model (infection_multiclass, so it serves both stages of ``analyze`` alone) is
trained once and shared by the checks of eval, predict, test-time augmentation and analyze.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covidqu.analyze.run import ANALYSIS_FILE, analyze
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.export.run import export
from covidqu.models.checkpoint import load_module
from covidqu.models.ensemble import load_model
from covidqu.models.multitask import MultitaskModule, check_loss_weights
from covidqu.predict.run import predict
from covidqu.runtime.checks import check_values, preflight
from covidqu.runtime.inputs import probabilities
from covidqu.scoring.calibration import binary_ece
from covidqu.train.checks import check_config
from covidqu.train.run import build, train

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics

#: The index of COVID-19 in the class order (0 COVID-19, 1 Non-COVID, 2 Normal), written out
#: here rather than imported, so a wrong index in the code cannot agree with itself.
COVID_INDEX = 0
CLASS_COLUMNS = ("p_COVID-19", "p_Non-COVID", "p_Normal")


@pytest.fixture(scope="module")
def mt_run(trained_run: Callable[[str], Path]) -> Path:
    """A tiny multitask run (32 px, a few batches) on the infection_multiclass target (shared,
    read-only)."""
    return trained_run("multitask")


@pytest.fixture(scope="module")
def mt_ckpt(mt_run: Path) -> Path:
    return mt_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def test_images(synth_root: Path, module_tmp: Callable[[str], Path]) -> Path:
    """Three test images of each class, at another size than the model's."""
    folder = synth_root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test"
    out = module_tmp("inputs")
    for cls in ("COVID-19", "Non-COVID", "Normal"):
        path = sorted((folder / cls / "images").glob("*.png"))[0]
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out / path.name), cv2.resize(image, (60, 50)))
    return out


def test_network_gives_both_outputs_and_the_loss_weighs_its_parts(synth_root, tmp_path):
    overrides = [*TINY, f"data.root={synth_root}", "task=multitask"]
    _, module = build(compose_config("train", overrides, tmp_path))
    assert isinstance(module, MultitaskModule)
    assert module.loss_weights == {"seg": 1.0, "cls": 0.5}  # the config's defaults
    masks, classes = module(torch.randn(2, 1, 32, 32))
    assert masks.shape == (2, 1, 32, 32) and classes.shape == (2, 3)

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 1, 32, 32, generator=gen), torch.randn(4, 3, generator=gen))
    batch = {"mask": (torch.rand(4, 1, 32, 32, generator=gen) > 0.7).float()}
    batch["label"] = torch.tensor([0, 1, 2, 0])
    seg = module.loss_fn(logits[0], batch["mask"])  # the loss group's dice + bce
    ce = F.cross_entropy(logits[1], batch["label"])
    for weights, expected in (
        ({"seg": 1.0, "cls": 0.0}, seg),
        ({"seg": 0.0, "cls": 1.0}, ce),
        ({"seg": 0.3, "cls": 2.0}, 0.3 * seg + 2.0 * ce),
    ):
        module.loss_weights = check_loss_weights(weights)
        total, parts = module.loss_of(logits, batch)
        assert torch.allclose(total, expected), weights
        assert torch.allclose(parts["seg"], seg) and torch.allclose(parts["cls"], ce)
        assert {"dice", "bce"} <= set(parts)  # the segmentation loss's own parts too
    with pytest.raises(ValueError, match=r"module\.loss_weights"):
        check_loss_weights({"seg": 0, "cls": 0})
    bad = compose_config("train", [*overrides, "module.loss_weights.cls=-1"], tmp_path)
    with pytest.raises(ConfigError, match=r"module\.loss_weights\.cls=-1"):
        check_values(bad, "train")
    headless = compose_config("train", [*overrides, "model.aux_params=null"], tmp_path)
    with pytest.raises(ConfigError, match=r"task=multitask needs model\.aux_params"):
        check_config(headless)


def test_training_writes_both_kinds_of_metrics_and_a_self_contained_checkpoint(mt_run, mt_ckpt):
    metrics = read_metrics(mt_run)
    assert metrics["monitor"] == "val/dice"
    seg = ("dice", "iou", "sensitivity", "specificity", "precision", "dice_covid", "iou_covid")
    cls = ("acc", "f1_macro", "auroc", "sensitivity_covid", "specificity_covid")
    for name in (*seg, *cls, "loss", "loss_seg", "loss_cls"):
        assert f"val/{name}" in metrics, name
    # the logged loss is the weighted sum of its logged parts (defaults: 1.0 and 0.5)
    expected = metrics["val/loss_seg"] + 0.5 * metrics["val/loss_cls"]
    assert math.isclose(metrics["val/loss"], expected, rel_tol=1e-5)

    ckpt = torch.load(mt_ckpt, map_location="cpu", weights_only=True)  # plain values only
    assert ckpt["covidqu"]["net"]["aux_params"]["classes"] == 3
    module = load_module(mt_ckpt)
    assert isinstance(module, MultitaskModule)
    assert module.loss_weights == {"seg": 1.0, "cls": 0.5}
    masks, classes = module(torch.zeros(1, 1, 32, 32))
    assert masks.shape == (1, 3, 32, 32) and classes.shape == (1, 3)


def test_eval_writes_both_kinds_and_rows_with_the_class(mt_ckpt, synth_root, tmp_path):
    args = [f"ckpt_path={mt_ckpt}", f"data.root={synth_root}", "data.num_workers=0"]
    args += ["data.batch_size=4", "num_overlays=0", "trainer.enable_progress_bar=false"]
    metrics = evaluate(compose_config("eval", args, tmp_path))
    assert {"test/dice", "test/dice_covid", "test/acc", "test/f1_macro", "test/auroc"} <= set(
        metrics
    )
    rows = read_csv(tmp_path / "per_image.csv")
    assert len(rows) == metrics["images"] == 9
    module = load_module(mt_ckpt)
    for row in rows:
        p = np.array([float(row[c]) for c in CLASS_COLUMNS])
        assert p.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == ("COVID-19", "Non-COVID", "Normal")[int(p.argmax())]
        assert int(row["correct"]) == int(row["predicted"] == row["class"])
        assert "dice" in row
    correct = np.mean([int(r["correct"]) for r in rows])
    assert metrics["test/acc"] == pytest.approx(correct, abs=1e-6)
    assert module.recipe["task"]["name"] == "multitask"


def test_flip_tta_averages_both_outputs(mt_ckpt):
    module = load_module(mt_ckpt)
    module.tta = "flip"
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pixels, classes = module.predict_probabilities(x)
        plain, mirrored = module(x), module(x.flip(-1))
    by_hand_pixels = (plain[0].softmax(1) + mirrored[0].softmax(1).flip(-1)) / 2
    by_hand_classes = (plain[1].softmax(1) + mirrored[1].softmax(1)) / 2
    assert torch.allclose(pixels, by_hand_pixels, atol=1e-6)
    assert torch.allclose(classes, by_hand_classes, atol=1e-6)
    assert not torch.allclose(classes, plain[1].softmax(1), atol=1e-4)  # the mirror counted


def test_predict_writes_masks_and_class_columns(mt_ckpt, test_images, tmp_path):
    rows = predict(mt_ckpt, test_images, tmp_path, device="cpu", progress_bar=False)
    assert len(rows) == 3
    module = load_module(mt_ckpt)
    for row in rows:
        name = Path(row["file"]).stem
        mask = cv2.imread(str(tmp_path / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (50, 60)
        image = cv2.imread(row["file"], cv2.IMREAD_GRAYSCALE)
        _, classes = probabilities(module, [image], "cpu")
        assert [row[c] for c in CLASS_COLUMNS] == pytest.approx(classes[0].tolist(), abs=1e-5)
    written = read_csv(tmp_path / "predictions.csv")
    assert {"predicted", *CLASS_COLUMNS, "area_fraction"} <= set(written[0])


def test_an_ensemble_of_multitask_models_averages_both_outputs(mt_ckpt, test_images, tmp_path):
    """Members give (pixel, class) pairs: each part of the ensemble's is the mean of theirs."""
    ckpt = torch.load(mt_ckpt, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():  # a second member: other heads
        if "_head" in key and value.is_floating_point():
            ckpt["state_dict"][key] = value + 0.2 * torch.randn(value.shape, generator=gen)
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    members = [load_module(mt_ckpt), load_module(other)]
    paths = [str(mt_ckpt), str(other)]
    rows = predict(paths, test_images, tmp_path / "out", device="cpu", progress_bar=False)
    ensemble = load_model(paths)
    for row in rows:
        image = cv2.imread(row["file"], cv2.IMREAD_GRAYSCALE)
        pixels, classes = zip(*(probabilities(m, [image], "cpu") for m in members), strict=True)
        assert not np.allclose(classes[0], classes[1])
        mean_classes = np.mean(classes, axis=0)[0]
        assert [row[c] for c in CLASS_COLUMNS] == pytest.approx(mean_classes.tolist(), abs=1e-5)
        ens_pixels, ens_classes = probabilities(ensemble, [image], "cpu")
        np.testing.assert_allclose(ens_pixels, np.mean(pixels, axis=0), atol=1e-5)
        np.testing.assert_allclose(ens_classes[0], mean_classes, atol=1e-5)


def test_analyze_scores_detection_by_the_classifier(mt_ckpt, test_images, tmp_path):
    out = tmp_path / "classifier"
    args = [f"infection_ckpt={mt_ckpt}", f"input={test_images}", f"output={out}"]
    args += ["detect.score=classifier", "trainer.enable_progress_bar=false"]
    summary = analyze(compose_config("analyze", args, tmp_path / "run"))
    assert summary["detect_score"] == "classifier"
    module = load_module(mt_ckpt)
    rows = read_csv(out / ANALYSIS_FILE)
    assert len(rows) == 3
    for row in rows:
        image = cv2.imread(row["file"], cv2.IMREAD_GRAYSCALE)
        _, classes = probabilities(module, [image], "cpu")
        assert float(row["covid_score"]) == pytest.approx(classes[0, COVID_INDEX], abs=1e-5)
        assert float(row["p_covid"]) == pytest.approx(float(row["covid_score"]), abs=1e-6)
        assert int(row["covid"]) == int(float(row["covid_score"]) >= 0.5)


def test_analyze_scores_a_split_by_the_mean(mt_ckpt, synth_root, tmp_path):
    args = [f"infection_ckpt={mt_ckpt}", f"data.root={synth_root}", "split=test"]
    args += ["detect.score=mean", "detect.threshold=0.3", "detect.n_boot=20"]
    args += ["trainer.enable_progress_bar=false"]
    analyze(compose_config("analyze", args, tmp_path))
    metrics = read_metrics(tmp_path)
    assert metrics["detect_score"] == "mean" and metrics["detect/threshold"] == 0.3
    rows = read_csv(tmp_path / ANALYSIS_FILE)
    assert len(rows) == 9
    for row in rows:
        mean = (float(row["severity_pct"]) / 100 + float(row["p_covid"])) / 2
        assert float(row["covid_score"]) == pytest.approx(mean, abs=1e-5)
    # the score is a probability already: its calibration error reads it as it is
    scores = np.array([float(r["covid_score"]) for r in rows])
    truth = np.array([int(r["true_covid"]) for r in rows])
    assert metrics["detect/ece"] == pytest.approx(binary_ece(scores, truth), abs=1e-6)


def _without_head(ckpt_path: Path, out: Path) -> Path:
    """The multitask checkpoint as a plain infection_multiclass one: no head, no class output."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    recipe = ckpt["covidqu"]
    recipe["net"].pop("aux_params")
    recipe["module_class"] = "covidqu.models.segmentation.SegmentationModule"
    recipe["metrics"] = recipe["metrics"]["segmentation"]
    recipe["module_kwargs"].pop("loss_weights")
    recipe["task"]["name"] = "infection"
    ckpt["state_dict"] = {
        k: v for k, v in ckpt["state_dict"].items() if "classification_head" not in k
    }
    torch.save(ckpt, out)
    return out


def test_classifier_score_without_a_head_and_export_are_refused(mt_ckpt, test_images, tmp_path):
    plain = _without_head(mt_ckpt, tmp_path / "plain.ckpt")
    load_module(plain)  # a valid checkpoint, only without the head
    args = [f"infection_ckpt={plain}", f"input={test_images}", f"output={tmp_path / 'out'}"]
    for score in ("classifier", "mean"):
        cfg = compose_config("analyze", [*args, f"detect.score={score}"], tmp_path / "run")
        refused = rf"detect\.score={score}.*infection_ckpt="
        with pytest.raises(ConfigError, match=refused):  # before anything is loaded
            preflight(cfg, "analyze", tmp_path / "run", [])
        with pytest.raises(ConfigError, match=refused):  # in-process callers too
            analyze(cfg)
    assert not (tmp_path / "out" / ANALYSIS_FILE).exists()
    # a fixed threshold in percent of the lung is off the classifier's 0..1 scale
    args = [f"infection_ckpt={mt_ckpt}", f"input={test_images}", "detect.score=classifier"]
    cfg = compose_config("analyze", [*args, "detect.threshold=1.5"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"detect\.threshold=1\.5.*detect\.score=classifier"):
        preflight(cfg, "analyze", tmp_path / "run", [])

    # export writes one output: the two-output network is refused, naming ckpt_path
    cfg = compose_config(
        "export",
        [f"ckpt_path={mt_ckpt}", "format=torchscript", f"output={tmp_path / 'm.pt'}"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"ckpt_path=.*classification head"):
        preflight(cfg, "export", tmp_path, [])
    with pytest.raises(ConfigError, match="classification head"):
        export(mt_ckpt, tmp_path / "m.pt", "torchscript")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_multitask_learns_both_tasks(module_tmp: Callable[[str], Path]):
    """On the synthetic sample, 12 short epochs at 64 px: both heads learn (about 0.7 accuracy,
    chance 0.33; about 0.6 infection Dice). Minutes on a CPU, hence slow."""
    from covidqu.data.synth import ensure_synthetic

    home = module_tmp("learn")
    root = ensure_synthetic(home / "cache", per_class=40, size=128)
    overrides = [o for o in TINY if not o.startswith("data.image_size")]
    overrides += ["task=multitask", f"data.root={root}", "data.image_size=64", "test=false"]
    overrides += ["data.batch_size=16", "trainer.max_epochs=12", "module.loss_weights.cls=1.0"]
    train(compose_config("train", overrides, home / "run"))
    metrics = read_metrics(home / "run")
    assert metrics["val/acc"] >= 0.5, metrics
    assert metrics["val/dice"] >= 0.4, metrics
