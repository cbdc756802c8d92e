"""The two-stage analysis: what ``python -m covidqu.analyze`` runs.

A lung model and an infection model (or one model trained on ``infection_multiclass`` for both)
segment each image; the infection is kept inside the predicted lung, its share of the lung is
the severity, the severity is graded, and an image whose infected share reaches the detection
threshold is called COVID-19. On any images (``input=``) it writes masks, overlays and
``analysis.csv``; on a split of the infection subset it also scores every step against the
ground truth (``metrics.json``, plots), choosing the detection threshold on another split.

The detection score (``detect.score``) is the infected share of the lung (``mask``, percent),
or, for an infection model with a classification head (``task=multitask``), its COVID-19
probability (``classifier``), or the mean of the two on one scale (``mean``: the infected
fraction of the lung, 0..1, and the probability).

It runs through a Lightning Trainer from the ``trainer`` group, as ``train`` and ``eval`` do: on
several processes (``trainer=ddp_cpu``) each analyses its share of the images, and the files
are those of one process, every image once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from covidqu.analyze.checks import USAGE, check_detect_score
from covidqu.analyze.stages import TwoStages, load_stages, run_stages, split_samples
from covidqu.data.loading import loader_workers
from covidqu.errors import ConfigError
from covidqu.models.postprocess import apply_config
from covidqu.models.tta import check_tta
from covidqu.runtime import outputs
from covidqu.runtime.checks import require
from covidqu.runtime.distributed import evaluation_trainer, job_scope
from covidqu.runtime.inputs import find_inputs
from covidqu.scoring import detection, plots
from covidqu.scoring.calibration import binary_ece, plot_reliability
from covidqu.scoring.detection import SCORE_AS_PROBABILITY, score_probability
from covidqu.scoring.severity import GRADES, check_cutoffs, severity_metrics

log = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.csv"
#: Where the detection threshold comes from when it is not given: the split it is tuned on, for
#: each split that is scored. The training split has none: give ``detect.threshold`` there.
TUNING_SPLIT = {"test": "val", "val": "train"}


def score(
    rows: Sequence[dict[str, Any]], threshold: float, source: str, cfg: DictConfig, out: Path
) -> dict:
    """``metrics.json``'s figures for rows of :func:`analyse_split`, and the plots."""
    scores = np.array([r["covid_score"] for r in rows], dtype=float)
    truth = np.array([r["true_covid"] for r in rows], dtype=int)
    metrics: dict[str, Any] = {}
    detect = detection.detection_metrics(
        scores, truth, threshold, n_boot=int(cfg.detect.n_boot), seed=int(cfg.detect.seed)
    )
    metrics.update({f"detect/{k}": v for k, v in detect.items()})
    kind = cfg.detect.get("score", "mask")
    probability = score_probability(scores, kind)
    metrics["detect/ece"] = binary_ece(probability, truth)
    metrics["detect/threshold"] = float(threshold)
    metrics["detect/threshold_source"] = source
    pred_pct = [r["severity_pct"] for r in rows]
    true_pct = [r["true_severity_pct"] for r in rows]
    pred_grade = [r["grade"] for r in rows]
    true_grade = [r["true_grade"] for r in rows]
    severity = severity_metrics(pred_pct, true_pct, pred_grade, true_grade, GRADES)
    metrics.update({f"severity/{k}": v for k, v in severity.items()})
    covid_rows = [r for r in rows if r["true_covid"]]
    for stage, keys, subset in (
        ("lung", ("dice_image", "iou_image"), rows),
        ("infection", ("dice_covid", "iou_covid"), covid_rows),
    ):
        for key, column in zip(keys, (f"{stage}_dice", f"{stage}_iou"), strict=True):
            values = [r[column] for r in subset]
            metrics[f"{stage}/{key}"] = float(np.mean(values)) if values else float("nan")
    metrics["images"] = len(rows)
    plots.plot_roc(scores, truth, threshold, out / "roc.png")
    plot_reliability(
        probability,
        truth,
        out / "reliability.png",
        title="detection",
        xlabel=SCORE_AS_PROBABILITY[kind],
        ylabel="share of COVID-19 images",
    )
    plots.plot_severity(pred_pct, true_pct, out / "severity.png")
    plots.plot_grade_confusion(pred_grade, true_grade, GRADES, out / "grade_confusion.png")
    return metrics


def trainer_config(cfg: DictConfig) -> DictConfig:
    """``cfg.trainer``, with the older ``device=cpu|cuda|cuda:N`` read as one device."""
    device = cfg.get("device")
    if device in (None, "", "auto"):
        return cfg.trainer
    name, _, index = str(device).partition(":")
    if name not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ConfigError(
            f"device={device} is not a device: give cpu, cuda or cuda:N, or use the trainer "
            "group (trainer=cpu, trainer=gpu, trainer=ddp trainer.devices=4)"
        )
    trainer = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(trainer):
        trainer.accelerator = "cpu" if name == "cpu" else "gpu"
        trainer.devices = [int(index)] if index else 1
        trainer.strategy = "auto"
    return trainer


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run the analysis the config asks for; return the figures (scored) or a summary.

    On several processes (``trainer=ddp_cpu``) each analyses its shard of the images and writes
    their pictures; the rows are gathered, and the first process scores and writes them once.
    """
    require(cfg, ["infection_ckpt"], USAGE)
    check_tta(cfg.get("tta", "none"))
    by, fixed = cfg.detect.get("score", "mask"), cfg.detect.get("threshold")
    check_detect_score(by, True, cfg.infection_ckpt, fixed)
    with job_scope():
        return _analyze(cfg)


def _seen_in_training(stages: Any, used: set[str]) -> list[str]:
    """The official splits among ``used`` (scored, or tuning the threshold) that a stage model
    trained on in part: a model of ``data.num_folds`` trained on Train + Val less one fold.
    Their figures, or the threshold chosen there, are then optimistic: said once, and kept in
    ``metrics.json``."""
    folds = [m for m in stages.modules() if (m.recipe.get("preprocess") or {}).get("num_folds")]
    if not folds or not used:
        return []
    log.warning(
        "a stage model was trained on folds of Train + Val (data.num_folds), so it trained on "
        "part of the official %s used here: its figures (or the threshold chosen there) are "
        "optimistic. Score split=test with a threshold from data it did not train on "
        "(detect.threshold=...)",
        " and ".join(sorted(used)),
    )
    return sorted(used)


def _analyze(cfg: DictConfig) -> dict[str, Any]:
    tta = cfg.get("tta", "none")
    stages = load_stages(cfg.get("lung_ckpt"), cfg.infection_ckpt, "cpu")
    by = cfg.detect.get("score", "mask")
    check_detect_score(
        by, stages.infection.class_head, cfg.infection_ckpt, cfg.detect.get("threshold")
    )
    for stage_module in stages.modules():
        stage_module.tta = tta  # both stages' masks are of the TTA mean
        apply_config(stage_module, OmegaConf.to_container(cfg.postprocess))
    trainer = evaluation_trainer(trainer_config(cfg))
    cutoffs = check_cutoffs(cfg.grades)
    out = Path(cfg.output or cfg.paths.output_dir).expanduser()  # made once the models fit
    out.mkdir(parents=True, exist_ok=True)
    fixed = cfg.detect.get("threshold")
    batch_size, workers = int(cfg.batch_size), loader_workers(cfg.data.get("num_workers") or 0)

    if cfg.get("input"):
        threshold = float(cfg.detect.default_threshold if fixed is None else fixed)
        files = find_inputs(cfg.input, recursive=cfg.get("recursive", False))
        module = TwoStages(stages, cutoffs, threshold, out, by)
        rows = run_stages(trainer, module, files, batch_size, workers)
        # no metrics.json here: each row names the TTA, as predict's rows do
        rows = [{**r, "tta": tta} if r["status"] == "ok" else r for r in rows]
        done = [r for r in rows if r["status"] == "ok"]
        if trainer.is_global_zero:
            outputs.write_rows(out / ANALYSIS_FILE, rows)
            log.info(
                "analysed %d of %d images into %s (%d COVID-19 calls at %s >= %.3g, tta=%s)",
                len(done),
                len(rows),
                out,
                sum(r["covid"] for r in done),
                by,
                threshold,
                tta,
            )
        return {"images": len(done), "threshold": threshold, "tta": tta, "detect_score": by}

    split = cfg.split
    limit = cfg.data.get("limit_per_class")
    # the threshold first, from anywhere but the split scored, so every row and overlay uses it
    if fixed is not None:
        threshold, source = float(fixed), "fixed"
    elif split in TUNING_SPLIT:
        source = TUNING_SPLIT[split]
        samples = split_samples(cfg.data.root, source, limit)
        # every process holds every row: each chooses the same threshold
        tuner = TwoStages(stages, cutoffs, 0.0, score=by)
        tuning = run_stages(trainer, tuner, samples, batch_size, workers)
        threshold = detection.choose_threshold(
            [r["covid_score"] for r in tuning], [r["true_covid"] for r in tuning]
        )
    else:
        raise ConfigError(
            f"split={split}: the detection threshold is tuned on another split "
            f"({', '.join(f'{k} on {v}' for k, v in TUNING_SPLIT.items())}); give "
            "detect.threshold=<percent of the lung> to score this one"
        )
    seen = _seen_in_training(stages, {split, source} & {"train", "val"})
    samples = split_samples(cfg.data.root, split, limit)
    module = TwoStages(stages, cutoffs, threshold, out, by)
    rows = run_stages(trainer, module, samples, batch_size, workers)
    metrics = None
    if trainer.is_global_zero:
        metrics = score(rows, threshold, source, cfg, out)
        metrics["split"] = split
        metrics["seen_in_training"] = seen
        metrics["tta"] = tta
        metrics["detect_score"] = by
        metrics["postprocess_lung"] = stages.lung.postprocess.describe()
        metrics["postprocess_infection"] = stages.infection.postprocess.describe()
        metrics["world_size"] = int(trainer.world_size)
        outputs.write_rows(out / ANALYSIS_FILE, rows)
        outputs.write_metrics(out, metrics)
        log.info(
            "scored %d %s images: detection sensitivity %.3f, specificity %.3f at %s >= %.3g "
            "(%s); outputs in %s",
            len(rows),
            split,
            metrics["detect/sensitivity"],
            metrics["detect/specificity"],
            by,
            threshold,
            source,
            out,
        )
    return trainer.strategy.broadcast(metrics)
