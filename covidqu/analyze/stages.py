"""The two stages on images: a lung and an infection model segment each image, the infection
is kept inside the lung, and each image gets its severity, grade and COVID-19 call (a row of
``analysis.csv``), its masks and its overlay.

:class:`TwoStages` runs both models as one module under ``trainer.predict``, so that several
processes (``trainer=ddp_cpu``) each analyse their shard of the images, every image once.
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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from covidqu.constants import COVID
from covidqu.data.layout import DataError, Sample, scan
from covidqu.data.readers import PngReader, read_image
from covidqu.errors import ConfigError
from covidqu.models.ensemble import load_model
from covidqu.models.figures import caption, tint
from covidqu.models.kept import gather_rows
from covidqu.runtime import outputs
from covidqu.runtime.inputs import output_names, probabilities
from covidqu.scoring.detection import called, detection_score
from covidqu.scoring.severity import grade, infected_share

log = logging.getLogger(__name__)


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
        # each model's own post-processing (its checkpoint's, or postprocess=none|all): the
        # lung's steps on the lung, the infection's on the infection inside that lung
        lung = stages.lung.postprocess.lung(stages.lung.region(lung_mask, "lung"))
        infection = stages.infection.region(inf_mask, "infection")
        infection = stages.infection.postprocess.infection(infection, lung) & lung
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
        "covid": int(called(covid_score, threshold)),
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
    from covidqu.data.layout import cap_per_class, resolve_data_root

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
