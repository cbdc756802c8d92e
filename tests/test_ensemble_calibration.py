"""Ensembles (``'ckpt_path=[A,B]'``) and calibrated scores (``ece``, ``calibrate=true``).

Two tiny classifiers (different seeds) and one tiny infection_multiclass model are built once
for the module, as freshly initialised networks saved as a run saves them (nothing here needs a
trained model, and training costs seconds); every test reuses them. Calibration works on a copy
of the first classifier, so its temperature never reaches the ensemble tests.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from covidqu.analyze import run as analysis
from covidqu.data.transforms import build_transform
from covidqu.errors import CheckpointError, ConfigError
from covidqu.eval.run import evaluate
from covidqu.eval.split import datamodule_for
from covidqu.models import calibration
from covidqu.models.checkpoint import load_module
from covidqu.models.ensemble import load_model, temperatures
from covidqu.models.metrics import ClassificationMetrics
from covidqu.predict.run import predict, prepare
from covidqu.runtime.checks import preflight
from covidqu.scoring import calibration as figures
from covidqu.scoring.calibration import binary_ece, ece
from covidqu.train.run import build

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics

CLASS_COLUMNS = ("p_COVID-19", "p_Non-COVID", "p_Normal")


def _untrained(root: Path, out: Path, *extra: str) -> Path:
    """A checkpoint as a run writes it (recipe and weights), of a freshly initialised network:
    what an ensemble and analyze do with it needs no training, and training costs seconds."""
    cfg = compose_config("train", [*TINY, f"data.root={root}", *extra], out)
    _, module = build(cfg)
    recipe = {**module.recipe, "module_class": f"{type(module).__module__}.{type(module).__name__}"}
    path = out / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"covidqu": recipe, "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def classifiers(synth_root: Path, module_tmp: Callable[[str], Path]) -> tuple[Path, Path]:
    """Two tiny classifiers that differ in their seed."""
    return tuple(  # type: ignore[return-value]
        _untrained(synth_root, module_tmp(f"cls{seed}"), "task=classify", f"seed={seed}")
        for seed in (0, 1)
    )


@pytest.fixture(scope="module")
def multiclass_ckpt(synth_root: Path, module_tmp: Callable[[str], Path]) -> Path:
    """An untrained infection_multiclass model: both stages of analyze on its own."""
    extra = ["task=infection", "data.target=infection_multiclass", "loss=dice_ce"]
    return _untrained(synth_root, module_tmp("multi"), *extra)


@pytest.fixture(scope="module")
def evals(classifiers, synth_root, module_tmp) -> Callable[..., tuple[dict, list[dict]]]:
    """Evaluate a ``ckpt_path`` value once per distinct call; (metrics.json, per_image rows)."""
    done: dict[tuple, tuple[dict, list[dict]]] = {}
    folder = module_tmp("evals")

    def run(ckpt: str, *extra: str) -> tuple[dict, list[dict]]:
        if (ckpt, extra) not in done:
            out = folder / f"run{len(done)}"
            overrides = [f"ckpt_path={ckpt}", f"data.root={synth_root}", "num_overlays=0"]
            overrides += ["data.num_workers=0", "trainer.accelerator=cpu", *extra]
            evaluate(compose_config("eval", overrides, out))
            done[(ckpt, extra)] = (read_metrics(out), read_csv(out / "per_image.csv"), out)
        return done[(ckpt, extra)][:2]

    run.folder_of = lambda ckpt, *extra: done[(ckpt, extra)][2]  # type: ignore[attr-defined]
    return run


def _probs(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[c]) for c in CLASS_COLUMNS] for r in rows])


def _with_recipe(src: Path, dst: Path, **changes: dict) -> Path:
    """A copy of checkpoint ``src`` whose recipe sections are updated by ``changes``."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    for section, values in changes.items():
        ckpt["covidqu"][section] = {**ckpt["covidqu"][section], **values}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"covidqu": ckpt["covidqu"], "state_dict": ckpt["state_dict"]}, dst)
    return dst


# -- ensembles -------------------------------------------------------------------------------


def test_an_ensemble_scores_the_mean_of_its_members_probabilities(classifiers, evals) -> None:
    a, b = classifiers
    metrics_a, rows_a = evals(str(a))
    _, rows_b = evals(str(b))
    metrics, rows = evals(f"[{a},{b}]")
    assert [r["id"] for r in rows] == [r["id"] for r in rows_a]
    mean = (_probs(rows_a) + _probs(rows_b)) / 2
    assert not np.allclose(_probs(rows_a), _probs(rows_b), atol=1e-3)  # members differ
    np.testing.assert_allclose(_probs(rows), mean, atol=2e-6)
    assert [r["predicted"] for r in rows] == [CLASS_COLUMNS[k][2:] for k in mean.argmax(1)]
    # the split's figures are of the mean too
    truth = [r["class"] for r in rows]
    acc = np.mean([CLASS_COLUMNS[k][2:] == t for k, t in zip(mean.argmax(1), truth, strict=True)])
    assert metrics["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["ensemble"] == 2
    assert metrics["checkpoint"] == [str(a.resolve()), str(b.resolve())]
    assert metrics_a["checkpoint"] == str(a.resolve()) and "ensemble" not in metrics_a
    assert metrics["test/ece"] >= 0 and "test/ece" in metrics_a


def test_an_ensemble_of_one_is_that_model(classifiers, evals) -> None:
    a, _ = classifiers
    metrics_a, rows_a = evals(str(a))
    metrics, rows = evals(f"[{a}]")
    assert rows == rows_a
    assert metrics["ensemble"] == 1 and metrics["checkpoint"] == [str(a.resolve())]
    figures = {k: v for k, v in metrics_a.items() if k.startswith("test/")}
    assert {k: metrics[k] for k in figures} == figures


def test_eval_draws_a_reliability_diagram(classifiers, evals) -> None:
    a, _ = classifiers
    evals(str(a))
    image = cv2.imread(str(evals.folder_of(str(a)) / "reliability.png"))
    assert image is not None and image.shape[0] > 100


def test_predict_takes_a_list_and_writes_the_mean(classifiers, synth_root, tmp_path) -> None:
    a, b = classifiers
    images = synth_root / "Lung Segmentation Data" / "Lung Segmentation Data" / "Test" / "Normal"
    src = images / "images"
    overrides = [f"ckpt_path=[{a},{b}]", f"input={src}", f"output={tmp_path / 'ens'}"]
    cfg = compose_config("predict", overrides, tmp_path / "run")
    preflight(cfg, "predict", tmp_path / "run", overrides)
    got = {}
    for name, ckpt in (("ens", cfg.ckpt_path), ("a", str(a)), ("b", str(b))):
        rows = predict(ckpt, src, tmp_path / name, num_workers=0, progress_bar=False)
        got[name] = _probs(rows)
    np.testing.assert_allclose(got["ens"], (got["a"] + got["b"]) / 2, atol=1e-6)


def test_mismatched_members_are_refused_naming_both_files(classifiers, tmp_path) -> None:
    a, _ = classifiers
    bigger = _with_recipe(a, tmp_path / "big" / "best.ckpt", preprocess={"image_size": 64})
    lung = _with_recipe(a, tmp_path / "lung" / "best.ckpt", task={"name": "lung"})
    for other, field in ((bigger, "data.image_size"), (lung, "task.name")):
        with pytest.raises(CheckpointError) as err:
            load_model([str(a), str(other)])
        assert str(a) in str(err.value) and str(other) in str(err.value)
        assert field in str(err.value)
        # and by the command's up-front checks, before anything is loaded
        overrides = [f"ckpt_path=[{a},{other}]"]
        cfg = compose_config("eval", overrides, tmp_path / "run")
        with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
            preflight(cfg, "eval", tmp_path / "run", overrides)
    cfg = compose_config("eval", ["ckpt_path=[]"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"ckpt_path=\[\] names no checkpoint"):
        preflight(cfg, "eval", tmp_path / "run", ["ckpt_path=[]"])


@torch.no_grad()
def test_analyze_takes_lists_and_reports_detection_ece(
    multiclass_ckpt, synth_root, tmp_path
) -> None:
    value = f"[{multiclass_ckpt},{multiclass_ckpt}]"
    overrides = [f"infection_ckpt={value}", f"data.root={synth_root}", "detect.threshold=1.0"]
    overrides += ["detect.n_boot=10", "trainer.accelerator=cpu"]
    cfg = compose_config("analyze", overrides, tmp_path)
    preflight(cfg, "analyze", tmp_path, overrides)
    analysis.analyze(cfg)
    metrics, rows = read_metrics(tmp_path), read_csv(tmp_path / "analysis.csv")
    scores = [float(r["covid_score"]) / 100 for r in rows]
    truth = [int(r["true_covid"]) for r in rows]
    assert metrics["detect/ece"] == pytest.approx(binary_ece(scores, truth), abs=1e-6)
    assert (tmp_path / "reliability.png").is_file()


# -- calibration ------------------------------------------------------------------------------


def test_ece_matches_a_hand_computation() -> None:
    # top probabilities 0.9 (right), 0.9 (wrong), 0.6 (right), 0.55 (right): two of 15 bins
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    truth = torch.tensor([0, 1, 1, 0])
    by_hand = 2 / 4 * abs(0.9 - 0.5) + 2 / 4 * abs((0.6 + 0.55) / 2 - 1.0)
    assert ece(probs, truth) == pytest.approx(by_hand, abs=1e-6)
    metric = ClassificationMetrics(num_classes=2)
    metric.update(probs.log(), truth)  # softmax(log p) = p
    assert float(metric.compute()["ece"]) == pytest.approx(by_hand, abs=1e-6)
    # binary: each bin's mean probability against its share of positives
    assert binary_ece([0.9, 0.9, 0.2, 0.0], [1, 0, 0, 0]) == pytest.approx(
        2 / 4 * abs(0.9 - 0.5) + 1 / 4 * 0.2 + 1 / 4 * 0.0, abs=1e-6
    )


def _printed_ece(monkeypatch: pytest.MonkeyPatch, *args: Any, **kwargs: Any) -> float:
    """The ECE :func:`figures.plot_reliability` writes in its diagram's title."""
    from matplotlib.figure import Figure

    titles: list[str] = []
    save = Figure.savefig

    def savefig(fig: Figure, *a: Any, **k: Any) -> None:
        titles.append(fig.axes[0].get_title())
        save(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    figures.plot_reliability(*args, **kwargs)
    (title,) = titles
    found = re.search(r"ECE (\d+\.\d+) over", title)
    assert found, title
    return float(found.group(1))


def test_the_reliability_diagram_prints_the_count_weighted_ece(monkeypatch, tmp_path) -> None:
    """The diagram's ECE is the one metrics.json reports: each bin's gap weighted by its count.
    The bins hold 40, 8 and 2 images, so a plain mean over bins would read about 0.3, not 0.1."""
    confident = np.linspace(0.94, 0.99, 40)  # bin 15 of 15: 36 of 40 right
    middling = np.linspace(0.74, 0.78, 8)  # bin 12: 4 of 8 right
    unsure = np.array([0.61, 0.63])  # bin 10: both wrong
    top = np.concatenate([confident, middling, unsure])
    correct = np.array([1] * 36 + [0] * 4 + [1, 0] * 4 + [0, 0])
    target = torch.zeros(len(top), dtype=torch.long)
    target[correct == 0] = 1  # class 0 holds the top probability: right where the truth is 0
    probs = torch.tensor(np.stack([top, 1 - top], axis=1))
    expected = figures.ece(probs, target)
    mean_conf, accuracy, counts = figures.reliability_bins(top, correct)
    assert sorted(counts[counts > 0].tolist()) == [2, 8, 40]
    unweighted = float(np.nanmean(np.abs(accuracy - mean_conf)))
    assert abs(unweighted - expected) > 0.1
    printed = _printed_ece(monkeypatch, top, correct, tmp_path / "eval.png")
    assert printed == pytest.approx(expected, abs=5e-4)

    # analyze's diagram: a probability of COVID-19 against the share of COVID-19 images
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    probability = np.concatenate([rng.uniform(0.01, 0.06, 60), [0.45, 0.5], rng.uniform(0.9, 1, 8)])
    truth = np.array([0] * 57 + [1] * 3 + [1, 1] + [1] * 5 + [0] * 3)
    expected = figures.binary_ece(probability, truth)
    mean_conf, accuracy, counts = figures.reliability_bins(probability, truth)
    assert abs(float(np.nanmean(np.abs(accuracy - mean_conf))) - expected) > 0.1
    printed = _printed_ece(monkeypatch, probability, truth, tmp_path / "detect.png")
    assert printed == pytest.approx(expected, abs=5e-4)


@pytest.fixture(scope="module")
def calibrated(classifiers, evals, module_tmp) -> tuple[Path, dict, list[dict]]:
    """A copy of the first classifier, evaluated with calibrate=true."""
    copy = module_tmp("calibrated") / "best.ckpt"
    shutil.copy(classifiers[0], copy)
    metrics, rows = evals(str(copy), "calibrate=true")
    return copy, metrics, rows


@torch.no_grad()
def test_calibrate_fits_the_temperature_on_val_and_keeps_it(
    calibrated, classifiers, evals, synth_root
) -> None:
    ckpt, metrics, rows = calibrated
    record = json.loads(calibration.sidecar_path(ckpt).read_text())
    temperature = record["temperature"]
    assert calibration.sidecar_path(ckpt).name == "best.calibration.json"
    assert temperature > 0 and not math.isclose(temperature, 1.0)
    assert metrics["temperature"] == pytest.approx(temperature)
    assert record["fitted_on"] == "val"
    assert metrics["val/nll_after"] <= metrics["val/nll_before"]
    # fitted on the validation split's logits, by hand
    module = load_module(classifiers[0])
    dm = datamodule_for(module.recipe["preprocess"], synth_root, num_workers=0)
    batches = list(dm.dataloader("val"))
    logits = torch.cat([module(b["image"]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert record["images"] == len(labels)
    assert temperature == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-4)
    assert metrics["val/nll_before"] == pytest.approx(calibration.nll(logits, labels), rel=1e-5)
    # the test split: the same argmax (acc unchanged), probabilities softmax(logits / T)
    plain_metrics, plain_rows = evals(str(classifiers[0]))
    assert metrics["test/acc"] == plain_metrics["test/acc"]
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in plain_rows]
    expected = torch.softmax(torch.tensor(np.log(_probs(plain_rows))) / temperature, dim=1)
    # (both read back from 6-digit CSV columns: the rounding sets the tolerance)
    np.testing.assert_allclose(_probs(rows), expected.numpy(), atol=2e-5)


@torch.no_grad()
def test_predict_and_load_module_use_the_temperature(calibrated, synth_root, tmp_path) -> None:
    ckpt, _, _ = calibrated
    temperature = load_module(ckpt).temperature
    assert temperature != 1.0
    image_dir = synth_root / "Lung Segmentation Data" / "Lung Segmentation Data" / "Val"
    image_file = next((image_dir / "COVID-19" / "images").iterdir())
    rows = predict(ckpt, image_file, tmp_path / "out", num_workers=0, progress_bar=False)
    module = load_module(ckpt)
    image = cv2.imread(str(image_file), cv2.IMREAD_GRAYSCALE)
    mean, std = module.normalisation
    x = prepare(image, build_transform(module.recipe["preprocess"]["image_size"]), mean, std)
    by_hand = torch.softmax(module(x[None]) / temperature, dim=1)[0].numpy()
    np.testing.assert_allclose(_probs(rows)[0], by_hand, atol=1e-6)
    plain = torch.softmax(module(x[None]), dim=1)[0].numpy()
    assert not np.allclose(plain, by_hand, atol=1e-4)


def test_a_stale_or_broken_sidecar(calibrated, classifiers, tmp_path, caplog) -> None:
    ckpt, _, _ = calibrated
    sidecar = calibration.sidecar_path(ckpt)
    # a copied checkpoint keeps its temperature; a retrained one (other weights) does not
    copied = tmp_path / "copied" / "best.ckpt"
    copied.parent.mkdir()
    shutil.copy(ckpt, copied)
    shutil.copy(sidecar, calibration.sidecar_path(copied))
    assert load_module(copied).temperature == load_module(ckpt).temperature != 1.0
    retrained = tmp_path / "retrained" / "best.ckpt"
    retrained.parent.mkdir()
    shutil.copy(classifiers[1], retrained)
    shutil.copy(sidecar, calibration.sidecar_path(retrained))
    with caplog.at_level(logging.WARNING):
        assert load_module(retrained).temperature == 1.0
    assert "fitted to other weights" in caplog.text and str(retrained) in caplog.text
    calibration.sidecar_path(retrained).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"calibration\.json"):
        load_module(retrained)


@torch.no_grad()
def test_an_ensemble_applies_each_members_own_temperature(
    classifiers, synth_root, tmp_path
) -> None:
    """Each member's probabilities come from its own logits over its own temperature: the
    ensemble's are the mean of ``softmax(logits_i / T_i)``, which neither one temperature for
    both members nor a member left at 1 would give."""
    chosen = (0.2, 0.05)  # below 1: an untrained network's small logits grow apart
    copies = []
    for src, temperature in zip(classifiers, chosen, strict=True):
        dst = tmp_path / src.parent.parent.name / "best.ckpt"
        dst.parent.mkdir(parents=True)
        shutil.copy(src, dst)
        weights = torch.load(dst, map_location="cpu", weights_only=True)["state_dict"]
        record = {
            "temperature": temperature,
            "fingerprint": calibration.weights_fingerprint(weights),
        }
        calibration.write_sidecar(dst, record)
        copies.append(dst)
    ensemble = load_model([str(p) for p in copies])
    assert temperatures(ensemble) == list(chosen)

    plain = [load_module(p) for p in classifiers]  # the same weights, no sidecar: T = 1
    assert [m.temperature for m in plain] == [1.0, 1.0]
    dm = datamodule_for(plain[0].recipe["preprocess"], synth_root, num_workers=0)
    image = next(iter(dm.dataloader("test")))["image"]
    logits = [m(image).double() for m in plain]

    def mean_of(t_a: float, t_b: float) -> torch.Tensor:
        return (torch.softmax(logits[0] / t_a, 1) + torch.softmax(logits[1] / t_b, 1)) / 2

    got = ensemble.predict_probabilities(image).double()
    torch.testing.assert_close(got, mean_of(*chosen), atol=1e-6, rtol=0)
    for wrong in ((0.2, 0.2), (0.05, 0.05), (0.2, 1.0), (1.0, 0.05), (1.0, 1.0)):
        assert (mean_of(*wrong) - mean_of(*chosen)).abs().max() > 1e-2, wrong


def test_calibrate_is_refused_where_it_cannot_work(classifiers, multiclass_ckpt, tmp_path):
    a, b = classifiers
    for value, why in ((str(multiclass_ckpt), "task=infection"), (f"[{a},{b}]", "each member")):
        overrides = [f"ckpt_path={value}", "calibrate=true"]
        cfg = compose_config("eval", overrides, tmp_path / "run")
        with pytest.raises(ConfigError, match=why):
            preflight(cfg, "eval", tmp_path / "run", overrides)
