"""The LightningModule for 3-class CXR classification (COVID-19 / Non-COVID / Normal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from covidqu.constants import CLASSES
from covidqu.models.base import CXRModule
from covidqu.models.figures import classification_panel, denormalise
from covidqu.models.task import logits_output


def confusion_table(matrix: Tensor | None) -> dict[str, list[dict[str, Any]]]:
    """``{"confusion_matrix": rows}``: one row per true class, one column per predicted class;
    empty without a matrix."""
    if matrix is None:
        return {}
    rows = [
        {"truth": truth, **{name: int(matrix[i, j]) for j, name in enumerate(CLASSES)}}
        for i, truth in enumerate(CLASSES)
    ]
    return {"confusion_matrix": rows}


def class_columns(probabilities: Tensor | np.ndarray) -> dict[str, Any]:
    """The predicted class and each class's probability (``p_<class>``) of one image, from
    its class probabilities (in :data:`~covidqu.constants.CLASSES` order)."""
    probs = [float(p) for p in probabilities]
    row: dict[str, Any] = {"predicted": CLASSES[int(np.argmax(probs))]}
    row.update({f"p_{name}": probs[c] for c, name in enumerate(CLASSES)})
    return row


class ClassificationModule(CXRModule):
    """Classification of a CXR into :data:`covidqu.constants.CLASSES` (in that order).

    Metrics: ``<stage>/acc``, ``f1_macro``, ``auroc`` (macro one-vs-rest),
    ``sensitivity_covid`` and ``specificity_covid`` (COVID-19 against the other two classes),
    and ``ece`` (expected calibration error), over the whole split. The confusion matrix of
    the last validation and test epochs is kept in :attr:`confusion` (rows: truth, columns:
    prediction).

    Args:
        **kwargs: see :class:`~covidqu.models.base.CXRModule`.
    """

    target_key = "label"
    calibration_refusal = None  # one tensor of class logits: a temperature fits them
    explain_refusal = None  # its one output is the class head's

    def class_scores(self, outputs: Tensor) -> Tensor:
        return outputs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.confusion: dict[str, Tensor] = {}

    def on_metrics_computed(self, stage: str, metric: Metric, values: dict[str, Tensor]) -> None:
        matrix = getattr(metric, "confusion_matrix", None)
        if stage != "train" and callable(matrix):
            self.confusion[stage] = matrix().detach().cpu()

    def record_test_batch(self, batch: Mapping[str, Any], logits: Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=1).cpu()
        pred = probs.argmax(dim=1).tolist()
        labels = batch["label"].tolist()
        for i, image_id in enumerate(batch["id"]):
            row: dict[str, Any] = {
                "id": image_id,
                "class": CLASSES[labels[i]],
                "predicted": CLASSES[pred[i]],
                "correct": int(pred[i] == labels[i]),
            }
            row.update({f"p_{name}": float(probs[i, c]) for c, name in enumerate(CLASSES)})
            self.test_records.append(row)

    def overlay_items(
        self, batch: Mapping[str, Any], logits: Tensor, at: list[int]
    ) -> list[dict[str, Any]]:
        """Each image at ``at`` with its class and the predicted probabilities."""
        probs = torch.softmax(logits[at].float(), dim=1).cpu()
        return [
            {
                "id": str(batch["id"][i]),
                "image": batch["image"][i, 0].float().cpu(),
                "label": int(batch["label"][i]),
                "prediction": int(probs[k].argmax()),
                "probabilities": probs[k],
            }
            for k, i in enumerate(at)
        ]

    def render_overlay(self, item: Mapping[str, Any]) -> np.ndarray:
        image = denormalise(item["image"].numpy(), *self.normalisation)
        return classification_panel(
            image, item["label"], item["prediction"], item["probabilities"].tolist()
        )

    def confusion_matrix(self, stage: str) -> Tensor | None:
        return self.confusion.get(stage)

    def test_reliability(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Each test image's top class probability, and whether that class is its own."""
        if not self.test_records:
            return None
        columns = [f"p_{name}" for name in CLASSES]
        probs = np.array([[r[c] for c in columns] for r in self.test_records], dtype=float)
        correct = np.array([r["correct"] for r in self.test_records], dtype=float)
        return probs.max(axis=1), correct

    def test_tables(self) -> dict[str, list[dict[str, Any]]]:
        """``confusion_matrix``: one row per true class, one column per predicted class."""
        return confusion_table(self.confusion.get("test"))

    def export_output(self, height: int, width: int) -> dict[str, Any]:
        """Class logits, ``batch x C``, in the recipe's class order."""
        names = list(self.recipe.get("classes") or CLASSES)
        return logits_output(names, ["batch", len(names)])

    def predict_outputs(
        self, image: np.ndarray, probabilities: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The predicted class and each class's probability; the image captioned with it."""
        k = int(probabilities.argmax())
        row = class_columns(probabilities)
        overlay = classification_panel(image, None, k, probabilities.tolist())
        return row, {"overlay": overlay}
