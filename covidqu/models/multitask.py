"""One network, two tasks (``task=multitask``): the infection mask and the image's class.

A segmentation network built with smp's ``aux_params`` carries a classification head on its
encoder and returns ``(mask logits, class logits)``. :class:`MultitaskModule` trains both
outputs together on the infection subset, whose images all have a mask and a class, and scores
each with its usual metrics (:class:`MultitaskMetrics`). Everywhere a module's outputs travel
(the test step, test-time augmentation, ``predict``, ``analyze``) they travel as that pair, in
that order: pixel outputs first, class outputs second.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from covidqu.models.base import CXRModule
from covidqu.models.classification import class_columns, confusion_table
from covidqu.models.losses import CrossEntropyLoss
from covidqu.models.segmentation import SegmentationModule

#: The parts of the loss, by the names of ``module.loss_weights``.
LOSS_PARTS = ("seg", "cls")
#: Their weights where ``module.loss_weights`` leaves one out.
DEFAULT_LOSS_WEIGHTS = {"seg": 1.0, "cls": 0.5}


def check_loss_weights(weights: Mapping[str, Any] | None) -> dict[str, float]:
    """``module.loss_weights`` with its defaults filled in; a ValueError naming the key for an
    unknown part, a weight that is not a finite number >= 0, or all weights zero."""
    given = dict(weights or {})
    unknown = sorted(set(given) - set(LOSS_PARTS))
    if unknown:
        raise ValueError(
            f"module.loss_weights names {unknown}; its parts are {list(LOSS_PARTS)} "
            "(e.g. module.loss_weights.cls=0.5)"
        )
    resolved = {}
    for name in LOSS_PARTS:
        value = given.get(name, DEFAULT_LOSS_WEIGHTS[name])
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(
                f"module.loss_weights.{name}={value!r} must be a finite number >= 0, "
                f"e.g. module.loss_weights.{name}={DEFAULT_LOSS_WEIGHTS[name]}"
            )
        resolved[name] = float(value)
    if not any(resolved.values()):
        raise ValueError(
            "module.loss_weights.seg and module.loss_weights.cls are both 0: nothing would be "
            "trained; give one a weight > 0"
        )
    return resolved


class MultitaskMetrics(nn.Module):
    """The segmentation metrics of the masks and the classification metrics of the classes,
    computed as one flat dict (``dice``, ..., ``dice_covid`` beside ``acc``, ``f1_macro``, ...).

    Each part is a torchmetrics metric that syncs its own states across processes, so this
    holder only routes the batch and merges the figures.

    Args:
        segmentation: a :class:`~covidqu.models.metrics.SegmentationMetrics`.
        classification: a :class:`~covidqu.models.metrics.ClassificationMetrics`.
    """

    def __init__(self, segmentation: Metric, classification: Metric) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.classification = classification

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.segmentation.class_names)

    @property
    def num_classes(self) -> int:
        return int(self.segmentation.num_classes)

    def clone(self) -> MultitaskMetrics:
        return copy.deepcopy(self)

    def update(self, masks: Tensor, target: Tensor, labels: Tensor, classes: Tensor) -> None:
        """Add a batch: mask logits against the masks (and the labels, for ``dice_covid``),
        class logits against the labels."""
        self.segmentation.update(masks, target, labels)
        self.classification.update(classes, labels)

    def compute(self) -> dict[str, Tensor]:
        seg, cls = self.segmentation.compute(), self.classification.compute()
        both = sorted(set(seg) & set(cls))
        if both:  # never with the project's metric sets: a clash would hide one figure
            raise ValueError(f"segmentation and classification metrics both give {both}")
        return {**seg, **cls}

    def reset(self) -> None:
        self.segmentation.reset()
        self.classification.reset()

    def confusion_matrix(self) -> Tensor:
        """C x C counts of the classes since the last reset: rows = truth, columns = prediction."""
        return self.classification.confusion_matrix()


class MultitaskModule(SegmentationModule):
    """Segmentation of the infection and classification of the image by one network.

    The loss is ``loss_weights.seg * <the loss group's segmentation loss> + loss_weights.cls *
    cross-entropy of the classes``, logged as ``<stage>/loss`` with its parts
    ``<stage>/loss_seg`` and ``<stage>/loss_cls`` (and those of a combined segmentation loss,
    ``loss_dice``, ``loss_bce``). Per-image rows and ``predict`` rows hold the segmentation's
    columns and the predicted class with each class's probability (``p_COVID-19``, ...).

    Args:
        loss_weights: ``{"seg": w, "cls": w}`` (:data:`DEFAULT_LOSS_WEIGHTS` for one left out).
        **kwargs: see :class:`~covidqu.models.segmentation.SegmentationModule`; ``metrics`` is a
            :class:`MultitaskMetrics`.
    """

    class_head = True
    # its temperature would have to reach the class half of a pair of outputs everywhere
    calibration_refusal = "its class head is not calibrated yet"
    explain_refusal = None  # its class head: the second of its outputs
    # two outputs need a second output name and metadata of their own, which the export
    # formats here do not describe yet; its masks alone come from a task=infection checkpoint
    export_refusal = (
        "a network with a classification head gives masks and class logits, two outputs"
    )

    def __init__(
        self, *args: Any, loss_weights: Mapping[str, float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_weights = check_loss_weights(loss_weights)
        self.class_loss = CrossEntropyLoss("multiclass")
        self.confusion: dict[str, Tensor] = {}

    # -- the two outputs ---------------------------------------------------------------------

    def mask_logits(self, outputs: tuple[Tensor, Tensor]) -> Tensor:
        return outputs[0]

    def class_scores(self, outputs: tuple[Tensor, Tensor]) -> Tensor:
        return outputs[1]

    def probabilities(self, logits: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return tuple(CXRModule.probabilities(self, part) for part in logits)

    def logits_of(self, probabilities: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return tuple(CXRModule.logits_of(self, part) for part in probabilities)

    def loss_of(
        self, logits: tuple[Tensor, Tensor], batch: Mapping[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        masks, classes = logits
        seg = self.loss_fn(masks, batch["mask"])
        cls = self.class_loss(classes, batch["label"])
        total = self.loss_weights["seg"] * seg + self.loss_weights["cls"] * cls
        parts = dict(getattr(self.loss_fn, "last", None) or {})
        parts.update(seg=seg.detach(), cls=cls.detach())
        return total, parts

    def update_metrics(
        self, stage: str, logits: tuple[Tensor, Tensor], batch: Mapping[str, Any]
    ) -> None:
        masks, classes = logits
        self.stage_metrics(stage).update(masks, batch["mask"], batch["label"], classes)

    # -- what the task shows -----------------------------------------------------------------

    def on_metrics_computed(self, stage: str, metric: Any, values: dict[str, Tensor]) -> None:
        if stage != "train":
            self.confusion[stage] = metric.confusion_matrix().detach().cpu()

    def confusion_matrix(self, stage: str) -> Tensor | None:
        return self.confusion.get(stage)

    def test_tables(self) -> dict[str, list[dict[str, Any]]]:
        """``confusion_matrix`` of the classes, as ``task=classify`` writes it."""
        return confusion_table(self.confusion.get("test"))

    def record_test_batch(self, batch: Mapping[str, Any], logits: tuple[Tensor, Tensor]) -> None:
        """The segmentation's rows, each with the predicted class, whether it is right, and
        each class's probability."""
        masks, classes = logits
        first = len(self.test_records)
        super().record_test_batch(batch, masks)
        probs = torch.softmax(classes.float(), dim=1).cpu()
        labels = batch["label"].tolist()
        for i, row in enumerate(self.test_records[first:]):
            columns = class_columns(probs[i])
            row["predicted"] = columns.pop("predicted")
            row["correct"] = int(int(probs[i].argmax()) == labels[i])
            row.update(columns)

    def predict_outputs(
        self, image: np.ndarray, probabilities: tuple[np.ndarray, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The segmentation's mask, overlay and columns, and the predicted class with each
        class's probability."""
        pixels, classes = probabilities
        row, pictures = super().predict_outputs(image, pixels)
        row.update(class_columns(classes))
        return row, pictures
