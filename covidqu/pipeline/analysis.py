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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset

from covidqu.analysis.severity import GRADES, check_cutoffs, grade, infected_share
from covidqu.constants import COVID
from covidqu.data.layout import DataError, Sample, scan
from covidqu.data.readers import PngReader, read_image
from covidqu.errors import ConfigError
from covidqu.models.base import gather_rows
from covidqu.models.calibration import binary_ece, plot_reliability
from covidqu.models.ensemble import load_model
from covidqu.models.figures import caption, tint
from covidqu.models.tta import check_tta
from covidqu.pipeline import outputs
from covidqu.pipeline.distributed import evaluation_trainer, job_scope
from covidqu.pipeline.prediction import find_inputs, output_names, probabilities

log = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.csv"
#: Where the detection threshold comes from when it is not given: the split it is tuned on, for
#: each split that is scored. The training split has none: give ``detect.threshold`` there.
TUNING_SPLIT = {"test": "val", "val": "train"}
#: The values of ``detect.score``: what an image's COVID-19 score is made of.
DETECT_SCORES = ("mask", "classifier", "mean")


def check_detect_score(
    score: str, has_head: bool, infection_ckpt: Any, threshold: float | None = None
) -> str:
    """``score`` if it is one of :data:`DETECT_SCORES`, the infection model can give it, and a
    fixed ``detect.threshold`` is on its scale; a :class:`ConfigError` naming ``detect.score``
    (and ``infection_ckpt`` or ``detect.threshold``) otherwise."""
    if score not in DETECT_SCORES:
        raise ConfigError(
            f"detect.score={score} is not one of {', '.join(DETECT_SCORES)}: e.g. detect.score=mask"
        )
    if score != "mask" and not has_head:
        raise ConfigError(
            f"detect.score={score} needs an infection model with a classification head, but "
            f"infection_ckpt={infection_ckpt} has none: give a task=multitask checkpoint as "
            "infection_ckpt, or use detect.score=mask"
        )
    if score != "mask" and threshold is not None and threshold > 1:
        raise ConfigError(
            f"detect.threshold={threshold} is a percent of the lung, but detect.score={score} "
            "scores from 0 to 1: give detect.threshold in [0, 1] (e.g. 0.5), or leave it null "
            "to tune it on another split"
        )
    return score


def detection_score(share: float, p_covid: float | None, score: str) -> float:
    """An image's COVID-19 score under ``detect.score``: the infected share of the lung
    (percent), the classifier's COVID-19 probability, or the mean of the infected fraction
    (share / 100) and that probability."""
    if score == "mask":
        return share
    if p_covid is None:
        raise ValueError(f"detect.score={score} needs the infection model's class probabilities")
    return p_covid if score == "classifier" else (share / 100.0 + p_covid) / 2.0


#: What the probability of COVID-19 that ``detect/ece`` and the reliability diagram score is,
#: for each ``detect.score``.
SCORE_AS_PROBABILITY = {
    "mask": "infected share of the lung (as a probability of COVID-19)",
    "classifier": "classifier's probability of COVID-19",
    "mean": "mean of the infected fraction and the classifier's probability",
}


def score_probability(scores: np.ndarray, score: str) -> np.ndarray:
    """Detection scores as probabilities of COVID-19: the infected share of the lung is a
    percent (``mask``), the other scores are already in [0, 1]."""
    return scores / 100.0 if score == "mask" else scores


@dataclass
class Stages:
    """The models of the two stages (the same module for both with a multi-class model)."""

    lung: Any
    infection: Any

    def modules(self) -> list[Any]:
        return [self.lung] if self.lung is self.infection else [self.lung, self.infection]


def load_stages(lung_ckpt: Any, infection_ckpt: Any, device: str) -> Stages:
    """The two stages' modules; a missing ``lung_ckpt`` takes the lung from the infection model,
    which must then have been trained with ``data.target=infection_multiclass``. Either may
    list several checkpoints: their ensemble (:mod:`covidqu.models.ensemble`)."""
    infection = load_model(infection_ckpt, map_location=device, key="infection_ckpt")
    lung = load_model(lung_ckpt, map_location=device, key="lung_ckpt") if lung_ckpt else infection
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


def segment(
    stages: Stages, images: Sequence[np.ndarray], device: str | torch.device
) -> list[tuple[Any, Any]]:
    """The predicted lung and infection masks (bool, at each image's own size); the infection
    is kept inside the lung."""
    return [(lung, infection) for lung, infection, _ in stage_outputs(stages, images, device)]


def stage_outputs(
    stages: Stages, images: Sequence[np.ndarray], device: str | torch.device
) -> list[tuple[Any, Any, float | None]]:
    """:func:`segment`'s masks of each image, and the infection model's COVID-19 probability
    where it has a classification head (else ``None``)."""
    probs = {}
    for m in stages.modules():
        out = probabilities(m, images, device)
        # a model with a classification head gives (pixel, class) probabilities
        probs[id(m)] = out if isinstance(out, tuple) else (out, None)
    classes = probs[id(stages.infection)][1]
    out = []
    for i, img in enumerate(images):
        h, w = img.shape
        lung_mask = stages.lung.mask_at(probs[id(stages.lung)][0][i], h, w)
        inf_mask = stages.infection.mask_at(probs[id(stages.infection)][0][i], h, w)
        lung = stages.lung.region(lung_mask, "lung")
        infection = stages.infection.region(inf_mask, "infection") & lung
        out.append((lung, infection, None if classes is None else float(classes[i, COVID])))
    return out


def judge(
    lung: np.ndarray,
    infection: np.ndarray,
    cutoffs: dict,
    threshold: float,
    score: str = "mask",
    p_covid: float | None = None,
) -> dict:
    """Severity, grade and the COVID-19 call of one image from its masks and, for
    ``detect.score=classifier|mean`` (:func:`detection_score`), its COVID-19 probability
    ``p_covid``, which the row then holds too."""
    share = infected_share(lung, infection)
    covid_score = detection_score(share, p_covid, score)
    row = {
        "severity_pct": share,
        "grade": grade(share, cutoffs),
        "covid": int(covid_score >= threshold),
        "covid_score": covid_score,
    }
    if p_covid is not None:
        row["p_covid"] = p_covid
    return row


def overlay(image: np.ndarray, lung: np.ndarray, infection: np.ndarray, row: dict) -> np.ndarray:
    """The image with the lung outlined and tinted, the infection filled, the figures above."""
    label = lung.astype(np.uint8) + (infection & lung).astype(np.uint8)
    text = f"severity {row['severity_pct']:.1f}% {row['grade']} | COVID-19 " + (
        "yes" if row["covid"] else "no"
    )
    return caption(tint(image, label), text)


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


class Images(Dataset):
    """What the stages analyse, read in the loader's workers: image files (``input=``), or
    dataset samples with their true masks (``data.root=ROOT split=...``).

    An item is a dict with its ``index`` in the list (the order rows are written in), the
    ``name`` its pictures are written under, and the ``image`` or, for a file that cannot be
    read, the ``error``; a sample adds its id, class and true masks. Plain values only:
    Lightning walks each batch to move its tensors, and refuses frozen dataclasses.
    """

    def __init__(self, items: Sequence[Path | Sample]) -> None:
        self.items = list(items)
        paths = [i.image if isinstance(i, Sample) else i for i in self.items]
        names = output_names(paths)
        self.names = [names[p] for p in paths]
        self.reader = PngReader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out: dict[str, Any] = {"index": index, "name": self.names[index]}
        if isinstance(item, Sample):
            out.update(id=item.id, cls=item.cls, true_covid=int(item.label == COVID))
            out["image"] = self.reader.image(item)
            out["true_lung"] = self.reader.mask(item, "lung") > 0
            out["true_infection"] = (self.reader.mask(item, "infection") > 0) & out["true_lung"]
            return out
        out["file"] = item
        try:
            out["image"] = read_image(item)
        except DataError as err:
            log.error("skipped %s: %s", item, err)
            out["error"] = str(err)
        return out


class TwoStages(pl.LightningModule):
    """Both stages as one module for ``trainer.predict``: each process analyses its shard of
    the images (Lightning shards prediction without repeats), writes their pictures, and
    :attr:`rows` then holds every process's rows, in the images' order, on every process.

    Args:
        stages: the two models.
        cutoffs: the grades' lower bounds (``grades``).
        threshold: the detection score from which COVID-19 is called.
        out: where the masks and overlays go; ``None``: no pictures.
        score: what the detection score is (``detect.score``, :func:`detection_score`).
    """

    def __init__(
        self,
        stages: Stages,
        cutoffs: dict,
        threshold: float,
        out: Path | None = None,
        score: str = "mask",
    ) -> None:
        super().__init__()
        self.stages = stages
        self.models = nn.ModuleList(stages.modules())  # moved to the device with this module
        self.cutoffs = cutoffs
        self.threshold = threshold
        self.out = out
        self.score = score
        self.rows: list[dict[str, Any]] = []
        self._indexed: list[tuple[int, dict[str, Any]]] = []

    def on_predict_epoch_start(self) -> None:
        self._indexed = []

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[tuple]:
        """``(index, row)`` of each item of the batch; pictures of the readable ones."""
        found = []
        readable = [item for item in batch if "image" in item]
        images = [i["image"] for i in readable]
        masks = stage_outputs(self.stages, images, self.device) if readable else []
        for item, (lung, infection, p_covid) in zip(readable, masks, strict=True):
            row = self.describe(item, lung, infection, p_covid)
            if self.out is not None:
                _write_pictures(self.out, item["name"], item["image"], lung, infection, row)
            found.append((item["index"], row))
        for item in batch:
            if "image" not in item:
                row = {"file": str(item["file"]), "status": f"error: {item['error']}"}
                found.append((item["index"], row))
        self._indexed += found
        return found

    def describe(
        self,
        item: dict[str, Any],
        lung: np.ndarray,
        infection: np.ndarray,
        p_covid: float | None = None,
    ) -> dict:
        """The row of one image: the figures, and the truth beside them for a sample."""
        judged = judge(lung, infection, self.cutoffs, self.threshold, self.score, p_covid)
        if "file" in item:
            h, w = item["image"].shape
            row: dict[str, Any] = {"file": str(item["file"]), "status": "ok"}
            row.update(height=h, width=w)
            row.update(judged)
            return row
        true_lung, true_inf = item["true_lung"], item["true_infection"]
        true_share = infected_share(true_lung, true_inf)
        row = {"id": item["id"], "class": item["cls"]}
        row.update(judged)
        row["true_covid"] = item["true_covid"]
        row["true_severity_pct"] = true_share
        row["true_grade"] = grade(true_share, self.cutoffs)
        row["lung_dice"], row["lung_iou"] = _overlap(lung, true_lung)
        row["infection_dice"], row["infection_iou"] = _overlap(infection, true_inf)
        return row

    def on_predict_epoch_end(self) -> None:
        indexed = sorted(gather_rows(self._indexed), key=lambda pair: pair[0])
        self.rows = [row for _, row in indexed]


def run_stages(
    trainer: pl.Trainer,
    module: TwoStages,
    items: Sequence[Path | Sample],
    batch_size: int,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """The rows of ``items`` (every one once, in order), on every process."""
    loader = DataLoader(
        Images(items),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,  # images of any size, and items without one
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    return module.rows


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
    kind = cfg.detect.get("score", "mask")
    probability = score_probability(scores, kind)
    metrics["detect/ece"] = binary_ece(probability, truth)
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
    plot_reliability(
        probability,
        truth,
        out / "reliability.png",
        title="detection",
        xlabel=SCORE_AS_PROBABILITY[kind],
        ylabel="share of COVID-19 images",
    )
    scoring.plot_severity(pred_pct, true_pct, out / "severity.png")
    scoring.plot_grade_confusion(pred_grade, true_grade, GRADES, out / "grade_confusion.png")
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
    if not cfg.get("infection_ckpt"):
        raise ConfigError(
            "infection_ckpt is required: python -m covidqu.analyze lung_ckpt=LUNG.ckpt "
            "infection_ckpt=INF.ckpt input=FILE_OR_DIR (or data.root=ROOT split=test), or "
            "infection_ckpt alone for a model trained with data.target=infection_multiclass"
        )
    check_tta(cfg.get("tta", "none"))
    by, fixed = cfg.detect.get("score", "mask"), cfg.detect.get("threshold")
    check_detect_score(by, True, cfg.infection_ckpt, fixed)
    with job_scope():
        return _analyze(cfg)


def _analyze(cfg: DictConfig) -> dict[str, Any]:
    # here, not at the top: its module pulls in smp (through the losses), which the command's
    # start-up does without
    from covidqu.models.multitask import has_class_head

    tta = cfg.get("tta", "none")
    stages = load_stages(cfg.get("lung_ckpt"), cfg.infection_ckpt, "cpu")
    by = cfg.detect.get("score", "mask")
    check_detect_score(
        by, has_class_head(stages.infection.recipe), cfg.infection_ckpt, cfg.detect.get("threshold")
    )
    for stage_module in stages.modules():
        stage_module.tta = tta  # both stages' masks are of the TTA mean
    trainer = evaluation_trainer(trainer_config(cfg))
    cutoffs = check_cutoffs(cfg.grades)
    out = Path(cfg.output or cfg.paths.output_dir).expanduser()  # made once the models fit
    out.mkdir(parents=True, exist_ok=True)
    fixed = cfg.detect.get("threshold")
    batch_size, workers = int(cfg.batch_size), int(cfg.data.get("num_workers") or 0)

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
        from covidqu.analysis.scoring import choose_threshold

        samples = split_samples(cfg.data.root, source, limit)
        # every process holds every row: each chooses the same threshold
        tuner = TwoStages(stages, cutoffs, 0.0, score=by)
        tuning = run_stages(trainer, tuner, samples, batch_size, workers)
        threshold = choose_threshold(
            [r["covid_score"] for r in tuning], [r["true_covid"] for r in tuning]
        )
    else:
        raise ConfigError(
            f"split={split}: the detection threshold is tuned on another split "
            f"({', '.join(f'{k} on {v}' for k, v in TUNING_SPLIT.items())}); give "
            "detect.threshold=<percent of the lung> to score this one"
        )
    samples = split_samples(cfg.data.root, split, limit)
    module = TwoStages(stages, cutoffs, threshold, out, by)
    rows = run_stages(trainer, module, samples, batch_size, workers)
    metrics = None
    if trainer.is_global_zero:
        metrics = score(rows, threshold, source, cfg, out)
        metrics["split"] = split
        metrics["tta"] = tta
        metrics["detect_score"] = by
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
