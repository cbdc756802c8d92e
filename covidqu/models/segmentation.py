"""The LightningModule for lung and infection segmentation (binary or multi-class)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from covidqu.constants import CLASSES, TARGETS
from covidqu.models.base import CXRModule, detached
from covidqu.models.figures import denormalise, segmentation_panel, tint
from covidqu.models.kept import gather_rows
from covidqu.models.metrics import default_class_names, per_image_scores
from covidqu.models.postprocess import PostProcess
from covidqu.models.task import logits_output
from covidqu.scoring.severity import infected_share


class SegmentationModule(CXRModule):
    """Segmentation of a CXR: one sigmoid channel (binary) or a softmax over classes.

    Metrics (``<stage>/dice``, ``iou``, ``sensitivity``, ``specificity``, ``precision``) pool
    the pixel counts of the whole split. For multi-class targets they average the foreground
    classes and add ``dice_<class>``. Per-image scores in ``per_image.csv`` count an empty
    prediction of an empty mask (a Non-COVID or Normal image without infection) as a perfect
    score (dice = iou = 1), and any prediction on an empty mask as dice = iou = 0.

    Args:
        threshold: probability above which a pixel is foreground (binary only); a pixel at
            exactly the threshold is background.
        **kwargs: see :class:`~covidqu.models.base.CXRModule`.
    """

    def __init__(self, *args: Any, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"module.threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        #: Post-processing set by a command (``postprocess=none|all``); ``None``: the recipe's.
        self._postprocess: PostProcess | None = None
        #: ``postprocess=auto`` after training: the combinations of steps to score on the
        #: validation split (:func:`covidqu.models.postprocess.trials`), and each image's Dice
        #: under each of them.
        self.trials: dict[str, PostProcess] | None = None
        self.trial_rows: list[dict[str, float]] = []

    @property
    def postprocess(self) -> PostProcess:
        """The post-processing of this model's masks: as a command set it, else as the
        checkpoint's recipe records it (chosen on Val after training), else none."""
        if self._postprocess is not None:
            return self._postprocess
        return PostProcess.from_config(self.recipe.get("postprocess"))

    @postprocess.setter
    def postprocess(self, steps: PostProcess | None) -> None:
        self._postprocess = steps

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the network's output channels: its target's (from the recipe), else as the
        metrics name them."""
        target = self.recipe.get("preprocess", {}).get("target")
        if target in TARGETS:
            return TARGETS[target].classes
        names = getattr(self.val_metrics, "class_names", None)
        return tuple(names) if names else default_class_names(self.val_metrics.num_classes)

    def region(self, mask: np.ndarray, name: str) -> np.ndarray:
        """Where a predicted ``mask`` (from :meth:`mask_at`) shows class ``name``, with the
        classes after it, which lie inside it (the infection inside the lung): a binary
        model's foreground, or a multi-class model's classes from ``name`` on."""
        names = self.class_names
        if name not in names:
            raise ValueError(
                f"this model predicts {', '.join(names)}, not {name}: give a checkpoint trained "
                f"on a target with a {name} class"
            )
        return mask > 0 if len(names) == 1 else mask >= names.index(name)

    def mask_logits(self, outputs: Any) -> Tensor:
        """The mask logits among the network's outputs: all of them here (a network with a
        classification head returns more)."""
        return outputs

    def update_metrics(self, stage: str, logits: Tensor, batch: Mapping[str, Any]) -> None:
        """The masks, and the images' classes for the COVID-19-only figures."""
        self.stage_metrics(stage).update(logits, batch["mask"], batch.get("label"))

    def predict_masks(self, logits: Tensor) -> Tensor:
        """B x H x W integer masks: 0/1 for binary, the argmax class for multi-class."""
        if logits.shape[1] == 1:
            return (logits[:, 0].sigmoid() > self.threshold).long()
        return logits.argmax(dim=1)

    def clean_masks(
        self, masks: Tensor, lung: Tensor | None, steps: PostProcess | None = None
    ) -> Tensor:
        """``masks`` (from :meth:`predict_masks`) after ``steps`` (default: :attr:`postprocess`);
        ``lung``: the batch's true lung (B x 1 x H x W), which a binary infection mask is kept
        inside."""
        steps = self.postprocess if steps is None else steps
        if not steps.active:
            return masks
        found = masks.cpu().numpy()
        lungs = None if lung is None else (lung.reshape(found.shape) > 0.5).cpu().numpy()
        names = self.class_names
        cleaned = [
            steps.clean(m, names, None if lungs is None else lungs[i]) for i, m in enumerate(found)
        ]
        return torch.from_numpy(np.stack(cleaned)).to(masks.device)

    def mask_scores(self, masks: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-image scores (:func:`per_image_scores`) of masks already decided: logits that
        decide as ``masks`` do are scored, so the figures follow the module's own rules."""
        names = self.class_names
        if len(names) == 1:
            logits = (masks.float() * 20 - 10).unsqueeze(1)
            return per_image_scores(logits, target, mode="binary", threshold=0.5, num_classes=1)
        logits = torch.nn.functional.one_hot(masks.long(), len(names)).permute(0, 3, 1, 2) * 20.0
        return per_image_scores(
            logits, target, mode="multiclass", num_classes=len(names), class_names=names
        )

    # -- choosing the post-processing on the validation split ------------------------------------

    def on_validation_epoch_start(self) -> None:
        self.trial_rows = []

    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        logits, _ = self._step(batch, "val")
        if self.trials:
            masks = self.predict_masks(self.mask_logits(detached(logits)))
            dice = {
                key: self.mask_scores(
                    self.clean_masks(masks, batch.get("lung"), steps), batch["mask"]
                )["dice"]
                for key, steps in self.trials.items()
            }
            for i in range(masks.shape[0]):
                self.trial_rows.append({key: float(d[i]) for key, d in dice.items()})

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trials:
            self.trial_rows = gather_rows(self.trial_rows)

    # -- what the task shows ---------------------------------------------------------------------

    def overlay_items(
        self, batch: Mapping[str, Any], outputs: Any, at: list[int]
    ) -> list[dict[str, Any]]:
        """Each image at ``at`` with its truth and its predicted mask (as post-processed)."""
        lung = batch.get("lung")
        logits = self.mask_logits(outputs)[at]
        pred = self.clean_masks(self.predict_masks(logits), None if lung is None else lung[at])
        target = batch["mask"][at]
        target = target[:, 0] if target.dim() == 4 else target
        target = (target > 0.5) if target.is_floating_point() else target
        return [
            {
                "id": str(batch["id"][i]),
                "image": batch["image"][i, 0].float().cpu(),
                "target": target[k].long().cpu(),
                "prediction": pred[k].cpu(),
            }
            for k, i in enumerate(at)
        ]

    def record_test_batch(self, batch: Mapping[str, Any], logits: Tensor) -> None:
        mode = "binary" if logits.shape[1] == 1 else "multiclass"
        scores = per_image_scores(
            logits,
            batch["mask"],
            mode=mode,
            threshold=self.threshold,
            num_classes=logits.shape[1],
            class_names=self.class_names if mode == "multiclass" else None,
        )
        if self.postprocess.active:  # the rows score the masks as post-processed
            masks = self.clean_masks(self.predict_masks(logits), batch.get("lung"))
            scores = self.mask_scores(masks, batch["mask"])
        labels = batch["label"].tolist()
        for i, image_id in enumerate(batch["id"]):
            row: dict[str, Any] = {"id": image_id, "class": CLASSES[labels[i]]}
            row.update({k: float(v[i]) for k, v in scores.items()})
            self.test_records.append(row)

    def render_overlay(self, item: Mapping[str, Any]) -> np.ndarray:
        image = denormalise(item["image"].numpy(), *self.normalisation)
        return segmentation_panel(image, item["target"].numpy(), item["prediction"].numpy())

    @torch.no_grad()
    def media_panels(self, batch: Mapping[str, Any], n: int) -> list[tuple[str, np.ndarray]]:
        """Image | truth | prediction panels of the first ``n`` images of ``batch``."""
        n = min(n, int(batch["image"].shape[0]))
        precision = self.trainer.precision_plugin
        images = precision.convert_input(batch["image"][:n])
        with precision.val_step_context():
            outputs = self(images)
        items = self.overlay_items(batch, outputs, list(range(n)))
        return [(item["id"], self.render_overlay(item)) for item in items]

    def mask_at(self, probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
        """The predicted uint8 mask (0/1, or class indices) at another size: the probabilities
        (C x h x w) are resized first, then thresholded or arg-maxed, so edges stay smooth."""
        up = np.stack(
            [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in probabilities]
        )
        if up.shape[0] == 1:
            return (up[0] > self.threshold).astype(np.uint8)
        return up.argmax(axis=0).astype(np.uint8)

    def export_output(self, height: int, width: int) -> dict[str, Any]:
        """Pixel logits, ``batch x C x H x W``; a binary target's threshold with them."""
        names = self.class_names
        output = logits_output(names, ["batch", len(names), height, width])
        if len(names) == 1:
            output["threshold"] = float(self.threshold)
        return output

    def predict_outputs(
        self, image: np.ndarray, probabilities: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The mask at the input's own size (binary 0 / 255; classes spread over 0..255) and its
        overlay; the row has the size and the predicted foreground share, and where the classes
        include a lung and an infection, the infected share of the lung (severity)."""
        H, W = image.shape
        mask = self.postprocess.clean(self.mask_at(probabilities, H, W), self.class_names)
        classes = len(probabilities)
        png = mask * 255 if classes == 1 else np.round(mask * (255.0 / (classes - 1)))
        png = png.astype(np.uint8)
        row: dict[str, Any] = {
            "height": H,
            "width": W,
            "area_fraction": float((mask > 0).mean()),
        }
        if classes > 1 and {"lung", "infection"} <= set(self.class_names):
            infected = self.region(mask, "infection")
            row["infection_fraction"] = float(infected.mean())
            share = infected_share(self.region(mask, "lung"), infected)
            row["infected_share_of_lung"] = share / 100.0
        return row, {"mask": png, "overlay": tint(image, mask)}
