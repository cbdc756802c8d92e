"""The two-stage analysis: severity and grade by hand, and ``python -m covidqu.analyze``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from torch import nn

from covidqu.analyze import run as analysis
from covidqu.analyze import stages as stage_lib
from covidqu.models.metrics import SegmentationMetrics
from covidqu.models.segmentation import SegmentationModule
from covidqu.scoring.severity import GRADES, check_cutoffs, grade, infected_share

from pipeline_helpers import compose_config, read_csv, read_metrics, run_module

CUTOFFS = {"mild": 0.0, "moderate": 25.0, "severe": 50.0, "critical": 75.0}


# -- severity and grade, by hand -------------------------------------------------------------


def test_infected_share_counts_the_infection_inside_the_lung_only() -> None:
    lung = np.zeros((8, 8), bool)
    lung[:, :4] = True  # 32 lung pixels
    infection = np.zeros((8, 8), bool)
    infection[:2, :4] = True  # 8 inside the lung
    infection[:2, 6:] = True  # 4 outside it: not part of any lung
    assert infected_share(lung, infection) == pytest.approx(25.0)
    assert infected_share(np.zeros((8, 8)), infection) == 0.0  # no lung, nothing infected


@pytest.mark.parametrize(
    ("share", "expected"),
    [
        (0.0, "none"),
        (0.1, "mild"),
        (25.0, "mild"),
        (25.1, "moderate"),
        (60, "severe"),
        (99, "critical"),
    ],
)
def test_grades_start_above_their_bounds(share: float, expected: str) -> None:
    assert grade(share, CUTOFFS) == expected


def test_grade_cutoffs_are_checked() -> None:
    assert check_cutoffs(CUTOFFS) == CUTOFFS
    with pytest.raises(ValueError, match="moderate"):
        check_cutoffs({"mild": 0, "severe": 50, "critical": 75})
    with pytest.raises(ValueError, match=r"grades\.severe=20"):
        check_cutoffs({**CUTOFFS, "severe": 20.0})


def _module(target: str) -> SegmentationModule:
    """A module that predicts exactly the probabilities it is handed (for the stages)."""
    metrics = SegmentationMetrics(
        "binary" if target != "infection_multiclass" else "multiclass",
        1 if target != "infection_multiclass" else 3,
    )
    return SegmentationModule(
        net=nn.Identity(), loss=None, metrics=metrics, recipe={"preprocess": {"target": target}}
    )


def test_a_perfect_lung_model_and_a_known_infection_give_severity_and_grade(monkeypatch) -> None:
    lung = np.zeros((16, 16), np.float32)
    lung[2:14, 1:7] = 1.0  # left lung, 72 px
    lung[2:14, 9:15] = 1.0  # right lung, 72 px
    infection = np.zeros((16, 16), np.float32)
    infection[2:8, 1:7] = 1.0  # 36 px: a quarter of the lung...
    infection[2:4, 9:12] = 1.0  # ...plus 6 px: 42 of 144 = 29.2 %
    infection[0, :] = 1.0  # above the lung: left out
    stages = stage_lib.Stages(lung=_module("lung"), infection=_module("infection"))
    probs = {id(stages.lung): lung[None, None], id(stages.infection): infection[None, None]}
    monkeypatch.setattr(
        stage_lib, "probabilities", lambda module, images, device: probs[id(module)]
    )
    image = np.zeros((16, 16), np.uint8)
    ((pred_lung, pred_inf),) = stage_lib.segment(stages, [image], "cpu")
    assert np.array_equal(pred_lung, lung > 0)
    assert np.array_equal(pred_inf, (infection > 0) & (lung > 0))
    row = stage_lib.judge(pred_lung, pred_inf, CUTOFFS, threshold=30.0)
    assert row["severity_pct"] == pytest.approx(100 * 42 / 144)
    assert row["grade"] == "moderate"
    assert row["covid"] == 0 and row["covid_score"] == row["severity_pct"]  # below 30 %
    assert stage_lib.judge(pred_lung, pred_inf, CUTOFFS, threshold=29.0)["covid"] == 1


def test_one_multiclass_model_serves_both_stages(monkeypatch) -> None:
    both = _module("infection_multiclass")
    stages = stage_lib.Stages(lung=both, infection=both)
    label = np.zeros((8, 8), np.int64)
    label[:, :4] = 1  # lung
    label[:2, :4] = 2  # infection, inside the lung
    probs = np.eye(3, dtype=np.float32)[label].transpose(2, 0, 1)[None]
    monkeypatch.setattr(stage_lib, "probabilities", lambda module, images, device: probs)
    ((lung, infection),) = stage_lib.segment(stages, [np.zeros((8, 8), np.uint8)], "cpu")
    assert lung.sum() == 32 and infection.sum() == 8  # the lung includes its infection
    assert stage_lib.judge(lung, infection, CUTOFFS, 1.0)["severity_pct"] == pytest.approx(25.0)


# -- the command, on synthetic and real trees ------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(trained_run: Callable[[str], Path]) -> dict[str, Path]:
    """Tiny lung and infection models (32 px), trained briefly on the synthetic tree (shared,
    read-only)."""
    return {task: trained_run(task) / "checkpoints" / "best.ckpt" for task in ("lung", "infection")}


def test_analyze_images_writes_masks_overlays_and_rows(checkpoints, synth_root, tmp_path):
    folder = synth_root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(folder.glob("*/images/*.png"))[:3]:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(inputs / path.name), cv2.resize(image, (70, 50)))  # any size
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = run_module(
        "covidqu.analyze",
        [
            f"lung_ckpt={checkpoints['lung']}",
            f"infection_ckpt={checkpoints['infection']}",
            f"input={inputs}",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out / analysis.ANALYSIS_FILE)
    assert len(rows) == 4
    broken = [r for r in rows if r["status"] != "ok"]
    assert len(broken) == 1 and broken[0]["file"].endswith("broken.png")
    for row in (r for r in rows if r["status"] == "ok"):
        name = Path(row["file"]).stem
        lung = cv2.imread(str(out / f"{name}_lung_mask.png"), cv2.IMREAD_GRAYSCALE)
        infection = cv2.imread(str(out / f"{name}_infection_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert lung.shape == infection.shape == (50, 70)
        assert not (infection & ~lung).any()  # the infection lies inside the lung
        share = 100.0 * (infection > 0).sum() / max(1, (lung > 0).sum())
        assert float(row["severity_pct"]) == pytest.approx(share, abs=1e-3)
        assert row["grade"] in GRADES
        assert int(row["covid"]) == int(float(row["covid_score"]) >= 0.5)  # default threshold
        assert (out / f"{name}_overlay.png").is_file()


def test_scoring_test_uses_a_threshold_chosen_on_val(checkpoints, synth_root, tmp_path):
    from covidqu.scoring.detection import choose_threshold

    common = [
        f"lung_ckpt={checkpoints['lung']}",
        f"infection_ckpt={checkpoints['infection']}",
        f"data.root={synth_root}",
        "detect.n_boot=200",
    ]
    val_out = tmp_path / "val"  # in this process; the test split goes through the command
    val_args = [*common, "split=val", "detect.threshold=0"]
    analysis.analyze(compose_config("analyze", val_args, val_out))
    assert read_metrics(val_out)["detect/threshold_source"] == "fixed"
    val_rows = read_csv(val_out / analysis.ANALYSIS_FILE)
    val_scores = [float(r["covid_score"]) for r in val_rows]
    expected = choose_threshold(val_scores, [int(r["true_covid"]) for r in val_rows])
    assert expected not in val_scores  # midway between two Val scores, never on one

    test_out = tmp_path / "test"
    proc = run_module("covidqu.analyze", [*common, "split=test", f"hydra.run.dir={test_out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(test_out)
    assert metrics["detect/threshold_source"] == "val"
    assert metrics["detect/threshold"] == pytest.approx(expected, abs=1e-4)
    rows = read_csv(test_out / analysis.ANALYSIS_FILE)
    assert len(rows) == metrics["images"] == 9
    for row in rows:  # the val threshold is the one applied
        assert int(row["covid"]) == int(float(row["covid_score"]) >= metrics["detect/threshold"])
    for key in ("sensitivity", "specificity", "accuracy", "f1", "auroc"):
        assert metrics[f"detect/{key}_ci_low"] <= metrics[f"detect/{key}"]
        assert metrics[f"detect/{key}"] <= metrics[f"detect/{key}_ci_high"]
    keys = ["severity/mae_pct", "severity/grade_acc", "severity/grade_kappa"]
    keys += ["lung/dice_image", "lung/iou_image", "infection/dice_covid", "infection/iou_covid"]
    assert all(k in metrics for k in keys), sorted(metrics)
    lung_dice = np.mean([float(r["lung_dice"]) for r in rows])
    assert metrics["lung/dice_image"] == pytest.approx(lung_dice, abs=1e-4)
    for plot in ("roc.png", "severity.png", "grade_confusion.png"):
        assert cv2.imread(str(test_out / plot)) is not None, plot


def test_analyze_on_the_real_sample(checkpoints, sample_root, tmp_path):
    out = tmp_path / "real"
    models = [f"lung_ckpt={checkpoints['lung']}", f"infection_ckpt={checkpoints['infection']}"]
    args = [f"data.root={sample_root}", "split=test", "detect.threshold=1.0", "detect.n_boot=100"]
    analysis.analyze(compose_config("analyze", [*models, *args], out))
    metrics = read_metrics(out)
    assert metrics["detect/threshold_source"] == "fixed" and metrics["images"] > 0
    assert 0.0 <= metrics["lung/dice_image"] <= 1.0
    # and the input form, on the real images themselves
    images = sample_root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test"
    folder = next(images.glob("COVID-19/images"))
    inputs = [f"input={folder}", f"output={tmp_path / 'files'}"]
    analysis.analyze(compose_config("analyze", [*models, *inputs], tmp_path / "files_run"))
    rows = read_csv(tmp_path / "files" / analysis.ANALYSIS_FILE)
    assert len(rows) == len(list(folder.glob("*.png"))) and all(r["status"] == "ok" for r in rows)
    mask = cv2.imread(str(tmp_path / "files" / f"{Path(rows[0]['file']).stem}_lung_mask.png"), 0)
    assert mask.shape == (256, 256)  # the real images' own size


def test_analyze_refuses_a_lung_checkpoint_for_the_infection(checkpoints, tmp_path):
    cfg = OmegaConf.create(
        {"lung_ckpt": None, "infection_ckpt": str(checkpoints["lung"]), "device": "cpu"}
    )
    with pytest.raises(ValueError, match=r"infection_ckpt=.*task=infection"):
        stage_lib.load_stages(str(checkpoints["lung"]), cfg.infection_ckpt, "cpu")
    with pytest.raises(ValueError, match=r"without lung_ckpt.*lung_ckpt=LUNG\.ckpt"):
        stage_lib.load_stages(None, str(checkpoints["infection"]), "cpu")


def test_one_infection_multiclass_checkpoint_serves_both_stages(trained_run, synth_root, tmp_path):
    run = trained_run("infection_multiclass")  # task=infection, data.target=infection_multiclass
    out = tmp_path / "out"
    args = [f"infection_ckpt={run / 'checkpoints' / 'best.ckpt'}", f"data.root={synth_root}"]
    args += ["split=test", "detect.threshold=1.0", "detect.n_boot=50"]
    analysis.analyze(compose_config("analyze", args, out))
    rows = read_csv(out / analysis.ANALYSIS_FILE)
    assert len(rows) == 9
    for row in rows:
        lung = cv2.imread(str(out / f"{row['id']}_lung_mask.png"), cv2.IMREAD_GRAYSCALE)
        infection = cv2.imread(str(out / f"{row['id']}_infection_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert not (infection & ~lung).any()
        share = 100.0 * (infection > 0).sum() / max(1, (lung > 0).sum())
        assert float(row["severity_pct"]) == pytest.approx(share, abs=1e-3)


def test_a_score_exactly_at_the_threshold_is_called_covid_everywhere(
    checkpoints, synth_root, tmp_path, monkeypatch
):
    """``score >= threshold``: an image whose infected share is exactly the threshold is called
    COVID-19 in its ``covid`` column, in its overlay's caption and in the confusion counts
    behind metrics.json's sensitivity and specificity (and the ROC plot's operating point).

    The stages are replaced by masks made per image: the whole image is lung, and its top rows
    are infected, so shares are exact (12 of 48 rows: 25.0 %). The grades' cut-offs are given on
    the command line, and every row's grade follows them, not the defaults."""
    from matplotlib.figure import Figure

    from covidqu.data.readers import PngReader

    # infected rows of 48 per test image: COVID-19 at 50 %, 25 % (on the threshold), 12.5 %;
    # one Non-COVID image on the threshold too (a false positive), the rest clean
    rows_of = {"COVID-19": [24, 12, 6], "Non-COVID": [12, 0, 0], "Normal": [0, 0, 0]}
    samples = stage_lib.split_samples(synth_root, "test", None)
    reader = PngReader()
    infected_rows = {}
    for cls, counts in rows_of.items():
        mine = [s for s in samples if s.cls == cls]
        assert len(mine) == len(counts)
        for sample, k in zip(mine, counts, strict=True):
            infected_rows[reader.image(sample).tobytes()] = (sample.id, k)
    assert len(infected_rows) == len(samples)  # each image told apart by its pixels

    def stage_outputs(stages: object, images: list[np.ndarray], device: object) -> list[tuple]:
        out = []
        for image in images:
            _, k = infected_rows[image.tobytes()]
            assert image.shape == (48, 48)
            infection = np.zeros(image.shape, bool)
            infection[:k] = True
            out.append((np.ones(image.shape, bool), infection, None))
        return out

    captions: list[str] = []
    caption = stage_lib.caption
    monkeypatch.setattr(stage_lib, "stage_outputs", stage_outputs)
    monkeypatch.setattr(
        stage_lib, "caption", lambda img, text: captions.append(text) or caption(img, text)
    )
    legends: list[str] = []
    save = Figure.savefig

    def savefig(fig: Figure, *a: object, **k: object) -> None:
        legends.extend(
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
        )
        save(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)

    models = [f"lung_ckpt={checkpoints['lung']}", f"infection_ckpt={checkpoints['infection']}"]
    args = [f"data.root={synth_root}", "split=test", "detect.threshold=25", "detect.n_boot=10"]
    args += ["grades.moderate=10", "grades.severe=20", "grades.critical=40"]
    analysis.analyze(compose_config("analyze", [*models, *args, "data.num_workers=0"], tmp_path))
    metrics, rows = read_metrics(tmp_path), read_csv(tmp_path / analysis.ANALYSIS_FILE)

    by_id = {i: k for i, k in infected_rows.values()}
    assert [float(r["covid_score"]) for r in rows] == [100 * by_id[r["id"]] / 48 for r in rows]
    on_threshold = [r for r in rows if float(r["covid_score"]) == 25.0]
    assert {r["class"] for r in on_threshold} == {"COVID-19", "Non-COVID"}
    # 24 rows: 50 % (critical above 40; moderate by default), 12: 25 % (severe; mild by default),
    # 6: 12.5 % (moderate; mild by default), 0: none
    grade_of = {24: "critical", 12: "severe", 6: "moderate", 0: "none"}
    for row in rows:
        assert int(row["covid"]) == int(by_id[row["id"]] >= 12), row
        assert row["grade"] == grade_of[by_id[row["id"]]], row
    assert len(captions) == len(rows)  # one overlay per image, in the rows' order
    for row, text in zip(rows, captions, strict=True):
        assert text.endswith("COVID-19 yes" if row["covid"] == "1" else "COVID-19 no"), (row, text)

    called = np.array([int(r["covid"]) for r in rows], bool)
    truth = np.array([int(r["true_covid"]) for r in rows], bool)
    tp, fn = int((called & truth).sum()), int((~called & truth).sum())
    tn, fp = int((~called & ~truth).sum()), int((called & ~truth).sum())
    assert (tp, fn, tn, fp) == (2, 1, 5, 1)
    assert metrics["detect/threshold"] == 25.0
    assert metrics["detect/sensitivity"] == pytest.approx(tp / (tp + fn))
    assert metrics["detect/specificity"] == pytest.approx(tn / (tn + fp))
    assert f"threshold 25: sens {tp / (tp + fn):.3f}, spec {tn / (tn + fp):.3f}" in legends


def test_a_fold_model_says_its_val_figures_are_optimistic(
    checkpoints, synth_root, tmp_path, caplog
):
    """An infection model of data.num_folds trained on part of the official Val, where the
    threshold for Test is chosen: the command says so, and metrics.json keeps it."""
    import torch

    ckpt = torch.load(checkpoints["infection"], weights_only=True)
    ckpt["covidqu"]["preprocess"].update(num_folds=2, fold=0, fold_seed=0)
    folded = tmp_path / "fold0.ckpt"
    torch.save(ckpt, folded)
    common = [f"lung_ckpt={checkpoints['lung']}", f"data.root={synth_root}", "detect.n_boot=10"]
    common += ["data.limit_per_class=2", "data.num_workers=0"]
    for model, said in ((checkpoints["infection"], []), (folded, ["val"])):
        out = tmp_path / model.stem
        caplog.clear()
        analysis.analyze(compose_config("analyze", [*common, f"infection_ckpt={model}"], out))
        assert read_metrics(out)["seen_in_training"] == said
        warned = [r for r in caplog.records if "trained on folds of Train + Val" in r.getMessage()]
        assert len(warned) == len(said)
