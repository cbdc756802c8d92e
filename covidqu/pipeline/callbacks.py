"""Lightning callbacks of the training pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from covidqu.constants import CLASSES
from covidqu.pipeline.outputs import denormalise, segmentation_panel


class WandbMedia(pl.Callback):
    """Pictures of validation in Weights & Biases; a no-op without a :class:`WandbLogger`.

    After each validation (every ``every_n_epochs`` epochs of training, and every standalone
    ``trainer.validate``, e.g. of the best checkpoint) it logs:

    - segmentation: ``val/overlays``, image | truth | prediction panels of the first
      ``num_images`` images of the first validation batch;
    - classification: ``val/confusion_matrix``, a table of the split's confusion matrix (rows
      truth, columns prediction, in :data:`~covidqu.constants.CLASSES` order), and
      ``val/confusion_matrix_plot``, the same as a W&B confusion-matrix chart.

    Only rank zero does any work. Between the first batch and the end of validation it holds
    ``num_images`` small uint8 arrays (image, truth, prediction), nothing on the device.

    Args:
        num_images: how many overlays to log (0: none).
        every_n_epochs: log after the validation of every n-th training epoch.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        if num_images < 0:
            raise ValueError(f"callbacks.wandb_media.num_images must be >= 0, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(
                f"callbacks.wandb_media.every_n_epochs must be >= 1, got {every_n_epochs}"
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._logger: WandbLogger | None = None
        self._pending: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    # -- when --------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _active(self, trainer: pl.Trainer) -> bool:
        if self._logger is None or not trainer.is_global_zero or trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.FITTING:
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return trainer.state.fn == TrainerFn.VALIDATING

    # -- what --------------------------------------------------------------------------------------

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or self.num_images == 0:
            return
        if not self._active(trainer) or not hasattr(pl_module, "predict_masks"):
            return
        if not isinstance(batch, Mapping) or "mask" not in batch:
            return
        self._pending = self._overlay_arrays(trainer, pl_module, batch)

    @torch.no_grad()
    def _overlay_arrays(
        self, trainer: pl.Trainer, pl_module: Any, batch: Mapping[str, Any]
    ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        n = min(self.num_images, int(batch["image"].shape[0]))
        precision = trainer.precision_plugin
        images = precision.convert_input(batch["image"][:n])
        with precision.val_step_context():
            logits = pl_module(images)
        prediction = pl_module.predict_masks(logits).to(torch.uint8).cpu().numpy()
        target = batch["mask"][:n]
        target = target[:, 0] if target.dim() == 4 else target
        target = (target > 0.5) if target.is_floating_point() else target
        target = target.to(torch.uint8).cpu().numpy()
        pre = getattr(pl_module, "recipe", {}).get("preprocess", {})
        gray = denormalise(
            batch["image"][:n, 0].float().cpu().numpy(),
            float(pre.get("mean", 0.0)),
            float(pre.get("std", 1.0)),
        )
        ids = list(batch.get("id", [str(i) for i in range(n)]))[:n]
        return [(str(ids[i]), gray[i], target[i], prediction[i]) for i in range(n)]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's own epoch end, so its confusion matrix is this epoch's.
        pending, self._pending = self._pending, []
        if not self._active(trainer):
            return
        import wandb

        media: dict[str, Any] = {}
        if pending:
            media["val/overlays"] = [
                wandb.Image(
                    np.ascontiguousarray(segmentation_panel(image, target, pred)[..., ::-1]),
                    caption=image_id,
                )
                for image_id, image, target, pred in pending
            ]
        confusion = getattr(pl_module, "confusion", None)
        matrix = confusion.get("val") if isinstance(confusion, Mapping) else None
        if matrix is not None:
            media.update(confusion_media(matrix))
        if media and self._logger is not None:
            self._logger.log_metrics(media, step=trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = []


def confusion_media(matrix: Any, names: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """A W&B table (rows truth, columns prediction) and chart of a C x C confusion matrix."""
    import wandb

    counts = np.asarray(torch.as_tensor(matrix).cpu().long())
    k = counts.shape[0]
    labels = list(names[:k]) if len(names) >= k else [str(i) for i in range(k)]
    table = wandb.Table(
        columns=["truth", *labels],
        data=[[labels[i], *(int(v) for v in counts[i])] for i in range(k)],
    )
    long = wandb.Table(
        columns=["Actual", "Predicted", "nPredictions"],
        data=[[labels[i], labels[j], int(counts[i, j])] for i in range(k) for j in range(k)],
    )
    plot = wandb.plot_table(
        "wandb/confusion_matrix/v1",
        long,
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": "validation confusion matrix"},
    )
    return {"val/confusion_matrix": table, "val/confusion_matrix_plot": plot}
