"""The two-stage analysis: what ``python -m covidqu.analyze`` runs.

A lung model and an infection model (or one model trained on ``infection_multiclass`` for both)
segment each image; the infection is kept inside the predicted lung, its share of the lung is
the severity, the severity is graded, and an image whose infected share reaches the detection
threshold is called COVID-19. On any images (``input=``) it writes masks, overlays and
``analysis.csv``; on a split of the infection subset it also scores every step against the
ground truth (``metrics.json``, plots), choosing the detection threshold on another split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from covidqu.analysis.severity import GRADES, check_cutoffs, grade, infected_share
from covidqu.constants import COVID
from covidqu.data.layout import DataError, Sample, scan
from covidqu.data.readers import PngReader
from covidqu.errors import ConfigError
from covidqu.models.checkpoint import load_module
from covidqu.models.figures import caption, tint
from covidqu.pipeline import outputs
from covidqu.pipeline.prediction import (
    batches,
    find_inputs,
    output_names,
    probabilities,
    read_inputs,
    resolve_device,
)

log = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.csv"
#: Where the detection threshold comes from when it is not given: the split it is tuned on, for
#: each split that is scored. The training split has none: give ``detect.threshold`` there.
TUNING_SPLIT = {"test": "val", "val": "train"}


@dataclass
class Stages:
    """The models of the two stages (the same module for both with a multi-class model)."""

    lung: Any
    infection: Any

    def modules(self) -> list[Any]:
        return [self.lung] if self.lung is self.infection else [self.lung, self.infection]


def load_stages(lung_ckpt: str | None, infection_ckpt: str, device: str) -> Stages:
    """The two stages' modules; a missing ``lung_ckpt`` takes the lung from the infection model,
    which must then have been trained with ``data.target=infection_multiclass``."""
    infection = load_module(infection_ckpt, map_location=device)
    lung = load_module(lung_ckpt, map_location=device) if lung_ckpt else infection
    lung_classes = ", ".join(getattr(lung, "class_names", ()))
    if "lung" not in getattr(lung, "class_names", ()):
        raise ConfigError(
            f"lung_ckpt={lung_ckpt} predicts {lung_classes}, not the lung: give a task=lung "
            "checkpoint"
            if lung_ckpt
            else f"without lung_ckpt the lung comes from infection_ckpt={infection_ckpt}, which "
            f"predicts {lung_classes}, not the lung: add lung_ckpt=LUNG.ckpt, or give a "
            "checkpoint trained with data.target=infection_multiclass"
        )
    if "infection" not in getattr(infection, "class_names", ()):
        raise ConfigError(
            f"infection_ckpt={infection_ckpt} predicts "
            f"{', '.join(getattr(infection, 'class_names', ()))}, not the infection: give a "
            "task=infection checkpoint"
        )
    return Stages(lung=lung, infection=infection)


def segment(stages: Stages, images: Sequence[np.ndarray], device: str) -> list[tuple[Any, Any]]:
    """The predicted lung and infection masks (bool, at each image's own size); the infection
    is kept inside the lung."""
    probs = {id(m): probabilities(m, images, device) for m in stages.modules()}
    out = []
    for i, img in enumerate(images):
        h, w = img.shape
        lung_mask = stages.lung.mask_at(probs[id(stages.lung)][i], h, w)
        inf_mask = stages.infection.mask_at(probs[id(stages.infection)][i], h, w)
        lung = stages.lung.region(lung_mask, "lung")
        infection = stages.infection.region(inf_mask, "infection") & lung
        out.append((lung, infection))
    return out


def judge(lung: np.ndarray, infection: np.ndarray, cutoffs: dict, threshold: float) -> dict:
    """Severity, grade and the COVID-19 call of one image from its masks."""
    share = infected_share(lung, infection)
    return {
        "severity_pct": share,
        "grade": grade(share, cutoffs),
        "covid": int(share >= threshold),
        "covid_score": share,
    }


def overlay(image: np.ndarray, lung: np.ndarray, infection: np.ndarray, row: dict) -> np.ndarray:
    """The image with the lung outlined and tinted, the infection filled, the figures above."""
    label = lung.astype(np.uint8) + (infection & lung).astype(np.uint8)
    text = f"severity {row['severity_pct']:.1f}% {row['grade']} | COVID-19 " + (
        "yes" if row["covid"] else "no"
    )
    return caption(tint(image, label), text)


def analyse_files(cfg: DictConfig, stages: Stages, out: Path, threshold: float) -> list[dict]:
    """``input=`` form: every image file at ``cfg.input``; rows of ``analysis.csv``."""
    files = find_inputs(cfg.input, recursive=cfg.get("recursive", False))
    names = output_names(files)
    cutoffs = check_cutoffs(cfg.grades)
    readable, rows = read_inputs(files)
    chunks = list(batches(readable, int(cfg.batch_size)))
    for batch in track(chunks, description="analysing", disable=not chunks):
        masks = segment(stages, [img for _, img in batch], cfg.device)
        for (f, img), (lung, infection) in zip(batch, masks, strict=True):
            row = {"file": str(f), "status": "ok", "height": img.shape[0], "width": img.shape[1]}
            row.update(judge(lung, infection, cutoffs, threshold))
            _write_pictures(out, names[f], img, lung, infection, row)
            rows.append(row)
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["file"]])
    return rows


def _write_pictures(
    out: Path, name: str, image: np.ndarray, lung: np.ndarray, infection: np.ndarray, row: dict
) -> None:
    outputs.write_png(out / f"{name}_lung_mask.png", lung.astype(np.uint8) * 255)
    outputs.write_png(out / f"{name}_infection_mask.png", infection.astype(np.uint8) * 255)
    outputs.write_png(out / f"{name}_overlay.png", overlay(image, lung, infection, row))


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two masks; both empty counts as perfect (the metrics' rule)."""
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def split_samples(root: str | os.PathLike[str], split: str, limit: int | None) -> list[Sample]:
    """The infection subset's images of ``split`` (at most ``limit`` per class)."""
    from covidqu.data.datamodule import cap_per_class, resolve_data_root

    index = scan(resolve_data_root(root), subsets=["infection"])
    index.raise_on_problems("infection")
    samples = index.select(subset="infection", split=split)
    if not samples:
        raise DataError(
            f"no images in the {split} split of the infection subset under {root}: scoring "
            "needs the infection subset (data.root=/path/to/COVID-QU-Ex)"
        )
    return cap_per_class(samples, limit, 0, f"analyze/{split}")


def analyse_split(
    cfg: DictConfig,
    stages: Stages,
    samples: Iterable[Sample],
    out: Path | None,
    threshold: float,
) -> list[dict[str, Any]]:
    """Rows of predictions beside the truth for dataset samples (pictures when ``out``)."""
    reader = PngReader()
    cutoffs = check_cutoffs(cfg.grades)
    rows: list[dict[str, Any]] = []
    samples = list(samples)
    names = output_names([s.image for s in samples])
    chunks = list(batches(samples, int(cfg.batch_size)))
    for batch in track(chunks, description="analysing", disable=not chunks):
        images = [reader.image(s) for s in batch]
        masks = segment(stages, images, cfg.device)
        for s, img, (lung, infection) in zip(batch, images, masks, strict=True):
            true_lung = reader.mask(s, "lung") > 0
            true_inf = (reader.mask(s, "infection") > 0) & true_lung
            true_share = infected_share(true_lung, true_inf)
            row: dict[str, Any] = {"id": s.id, "class": s.cls}
            row.update(judge(lung, infection, cutoffs, threshold))
            row["true_covid"] = int(s.label == COVID)
            row["true_severity_pct"] = true_share
            row["true_grade"] = grade(true_share, cutoffs)
            row["lung_dice"], row["lung_iou"] = _overlap(lung, true_lung)
            row["infection_dice"], row["infection_iou"] = _overlap(infection, true_inf)
            if out is not None:
                _write_pictures(out, names[s.image], img, lung, infection, row)
            rows.append(row)
    return rows


def score(
    rows: Sequence[dict[str, Any]], threshold: float, source: str, cfg: DictConfig, out: Path
) -> dict:
    """``metrics.json``'s figures for rows of :func:`analyse_split`, and the plots."""
    from covidqu.analysis import scoring

    scores = np.array([r["covid_score"] for r in rows], dtype=float)
    truth = np.array([r["true_covid"] for r in rows], dtype=int)
    metrics: dict[str, Any] = {}
    detect = scoring.detection_metrics(
        scores, truth, threshold, n_boot=int(cfg.detect.n_boot), seed=int(cfg.detect.seed)
    )
    metrics.update({f"detect/{k}": v for k, v in detect.items()})
    metrics["detect/threshold"] = float(threshold)
    metrics["detect/threshold_source"] = source
    pred_pct = [r["severity_pct"] for r in rows]
    true_pct = [r["true_severity_pct"] for r in rows]
    pred_grade = [r["grade"] for r in rows]
    true_grade = [r["true_grade"] for r in rows]
    severity = scoring.severity_metrics(pred_pct, true_pct, pred_grade, true_grade, GRADES)
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
    scoring.plot_roc(scores, truth, threshold, out / "roc.png")
    scoring.plot_severity(pred_pct, true_pct, out / "severity.png")
    scoring.plot_grade_confusion(pred_grade, true_grade, GRADES, out / "grade_confusion.png")
    return metrics


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run the analysis the config asks for; return the figures (scored) or a summary."""
    if not cfg.get("infection_ckpt"):
        raise ConfigError(
            "infection_ckpt is required: python -m covidqu.analyze lung_ckpt=LUNG.ckpt "
            "infection_ckpt=INF.ckpt input=FILE_OR_DIR (or data.root=ROOT split=test), or "
            "infection_ckpt alone for a model trained with data.target=infection_multiclass"
        )
    device = resolve_device(cfg.device)
    cfg.device = device
    stages = load_stages(cfg.get("lung_ckpt"), cfg.infection_ckpt, device)
    out = Path(cfg.output or cfg.paths.output_dir).expanduser()  # made once the models fit
    out.mkdir(parents=True, exist_ok=True)
    fixed = cfg.detect.get("threshold")

    if cfg.get("input"):
        threshold = float(cfg.detect.default_threshold if fixed is None else fixed)
        rows = analyse_files(cfg, stages, out, threshold)
        outputs.write_rows(out / ANALYSIS_FILE, rows)
        done = [r for r in rows if r["status"] == "ok"]
        log.info(
            "analysed %d of %d images into %s (%d COVID-19 calls at threshold %.3g %%)",
            len(done),
            len(rows),
            out,
            sum(r["covid"] for r in done),
            threshold,
        )
        return {"images": len(done), "threshold": threshold}

    split = cfg.split
    limit = cfg.data.get("limit_per_class")
    # the threshold first, from anywhere but the split scored, so every row and overlay uses it
    if fixed is not None:
        threshold, source = float(fixed), "fixed"
    elif split in TUNING_SPLIT:
        source = TUNING_SPLIT[split]
        from covidqu.analysis.scoring import choose_threshold

        tuning = analyse_split(cfg, stages, split_samples(cfg.data.root, source, limit), None, 0.0)
        threshold = choose_threshold(
            [r["covid_score"] for r in tuning], [r["true_covid"] for r in tuning]
        )
    else:
        raise ConfigError(
            f"split={split}: the detection threshold is tuned on another split "
            f"({', '.join(f'{k} on {v}' for k, v in TUNING_SPLIT.items())}); give "
            "detect.threshold=<percent of the lung> to score this one"
        )
    rows = analyse_split(cfg, stages, split_samples(cfg.data.root, split, limit), out, threshold)
    metrics = score(rows, threshold, source, cfg, out)
    metrics["split"] = split
    outputs.write_rows(out / ANALYSIS_FILE, rows)
    outputs.write_metrics(out, metrics)
    log.info(
        "scored %d %s images: detection sensitivity %.3f, specificity %.3f at %.3g %% (%s); "
        "outputs in %s",
        len(rows),
        split,
        metrics["detect/sensitivity"],
        metrics["detect/specificity"],
        threshold,
        source,
        out,
    )
    return metrics
