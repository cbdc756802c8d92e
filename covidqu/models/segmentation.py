"""The LightningModule for lung and infection segmentation (binary or multi-class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from covidqu.constants import CLASSES
from covidqu.models.base import CXRModule
from covidqu.models.metrics import per_image_scores


class SegmentationModule(CXRModule):
    """Segmentation of a CXR: one sigmoid channel (binary) or a softmax over classes.

    Metrics (``<stage>/dice``, ``iou``, ``sensitivity``, ``specificity``, ``precision``) pool
    the pixel counts of the whole split. For multi-class targets they average the foreground
    classes and add ``dice_<class>``. Per-image scores in ``per_image.csv`` count an empty
    prediction of an empty mask (a Non-COVID or Normal image without infection) as a perfect
    score (dice = iou = 1), and any prediction on an empty mask as dice = iou = 0.

    Args:
        threshold: probability above which a pixel is foreground (binary only).
        class_names: names of the output channels of a multi-class network (for per-class
            metric names), e.g. ``[background, lung, infection]``.
        **kwargs: see :class:`~covidqu.models.base.CXRModule`.
    """

    def __init__(
        self,
        *args: Any,
        threshold: float = 0.5,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"module.threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.class_names = list(class_names) if class_names else None

    def predict_masks(self, logits: Tensor) -> Tensor:
        """B x H x W integer masks: 0/1 for binary, the argmax class for multi-class."""
        if logits.shape[1] == 1:
            return (logits[:, 0].sigmoid() > self.threshold).long()
        return logits.argmax(dim=1)

    def record_test_batch(self, batch: Mapping[str, Any], logits: Tensor) -> None:
        mode = "binary" if logits.shape[1] == 1 else "multiclass"
        scores = per_image_scores(
            logits,
            batch["mask"],
            mode=mode,
            threshold=self.threshold,
            num_classes=logits.shape[1],
        )
        labels = batch["label"].tolist()
        for i, image_id in enumerate(batch["id"]):
            row: dict[str, Any] = {"id": image_id, "class": CLASSES[labels[i]]}
            row.update({k: float(v[i]) for k, v in scores.items()})
            self.test_records.append(row)
        if len(self.overlays) < self.keep_overlays:
            pred = self.predict_masks(logits)
            target = batch["mask"]
            target = target[:, 0] if target.dim() == 4 else target
            for i in range(min(len(batch["id"]), self.keep_overlays - len(self.overlays))):
                self.overlays.append(
                    {
                        "id": batch["id"][i],
                        "image": batch["image"][i, 0].float().cpu(),
                        "target": target[i].long().cpu(),
                        "prediction": pred[i].cpu(),
                    }
                )
