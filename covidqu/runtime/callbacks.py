"""Lightning callbacks every training run may list (conf/callbacks/): pictures and confusion
matrices of validation in W&B and TensorBoard; the moving average of the weights that
``ema=true`` adds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from covidqu.constants import CLASSES


class ValidationMedia(pl.Callback):
    """Pictures of validation in an experiment tracker; a no-op without its logger.

    After each validation (every ``every_n_epochs`` epochs of training, and every standalone
    ``trainer.validate``, e.g. of the best checkpoint) it hands the tracker:

    - the module's pictures of the first ``num_images`` images of the first validation batch
      (:meth:`~covidqu.models.task.TaskContract.media_panels`; segmentation: image | truth |
      prediction panels, as the overlays of a test run are rendered);
    - where the module keeps a confusion matrix (classification): that of the epoch.

    Only rank zero does any work. Between the first batch and the end of validation it holds
    ``num_images`` small uint8 pictures, nothing on the device. A subclass names its logger
    class (:attr:`logger_type`) and writes the pictures and matrix (:meth:`publish`).

    Args:
        num_images: how many overlays to log (0: none).
        every_n_epochs: log after the validation of every n-th training epoch.
    """

    #: The Lightning logger class the pictures go to.
    logger_type: ClassVar[type[Logger]] = Logger
    #: The callback's entry in ``conf/callbacks/default.yaml``, for error messages.
    config_key: ClassVar[str] = "media"

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        key = f"callbacks.{self.config_key}"
        if num_images < 0:
            raise ValueError(f"{key}.num_images must be >= 0, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"{key}.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._logger: Logger | None = None
        self._pending: list[tuple[str, np.ndarray]] = []

    # -- when --------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._logger = next(
            (lg for lg in trainer.loggers if isinstance(lg, self.logger_type)), None
        )

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
        if not self._active(trainer) or not isinstance(batch, Mapping):
            return
        media_panels = getattr(pl_module, "media_panels", None)
        if callable(media_panels):
            self._pending = media_panels(batch, self.num_images)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's own epoch end, so its confusion matrix is this epoch's.
        pending, self._pending = self._pending, []
        if not self._active(trainer) or self._logger is None:
            return
        confusion = getattr(pl_module, "confusion_matrix", None)
        matrix = confusion("val") if callable(confusion) else None
        self.publish(self._logger, trainer.global_step, pending, matrix)

    def publish(
        self, logger: Any, step: int, panels: list[tuple[str, np.ndarray]], matrix: Any
    ) -> None:
        """Write captioned BGR ``panels`` and the confusion ``matrix`` (or None) at ``step``."""
        raise NotImplementedError

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = []


class WandbMedia(ValidationMedia):
    """Validation pictures in Weights & Biases: ``val/overlays`` (captioned images) and, for
    classification, ``val/confusion_matrix`` (a table, rows truth, columns prediction, in
    :data:`~covidqu.constants.CLASSES` order) and ``val/confusion_matrix_plot`` (W&B's chart).
    See :class:`ValidationMedia`."""

    logger_type = WandbLogger
    config_key = "wandb_media"

    def publish(
        self, logger: Any, step: int, panels: list[tuple[str, np.ndarray]], matrix: Any
    ) -> None:
        import wandb

        media: dict[str, Any] = {}
        if panels:
            media["val/overlays"] = [
                wandb.Image(np.ascontiguousarray(panel[..., ::-1]), caption=image_id)
                for image_id, panel in panels
            ]
        if matrix is not None:
            media.update(confusion_media(matrix))
        if media:
            logger.log_metrics(media, step=step)


class TensorBoardMedia(ValidationMedia):
    """Validation pictures in TensorBoard's IMAGES tab, one card per image,
    ``val/overlays/<image id>`` (the same images each epoch: the step slider follows one image
    through training), and, for classification, ``val/confusion_matrix`` as a table in the
    TEXT tab. See :class:`ValidationMedia`."""

    logger_type = TensorBoardLogger
    config_key = "tensorboard_media"

    def publish(
        self, logger: Any, step: int, panels: list[tuple[str, np.ndarray]], matrix: Any
    ) -> None:
        writer = logger.experiment
        for image_id, panel in panels:
            rgb = np.ascontiguousarray(panel[..., ::-1])
            writer.add_image(f"val/overlays/{image_id}", rgb, step, dataformats="HWC")
        if matrix is not None:
            writer.add_text("val/confusion_matrix", confusion_markdown(matrix), step)
        writer.flush()


def _labels(k: int, names: tuple[str, ...]) -> list[str]:
    return list(names[:k]) if len(names) >= k else [str(i) for i in range(k)]


def confusion_markdown(matrix: Any, names: tuple[str, ...] = CLASSES) -> str:
    """A C x C confusion matrix as a Markdown table (rows truth, columns prediction)."""
    counts = np.asarray(torch.as_tensor(matrix).cpu().long())
    labels = _labels(counts.shape[0], names)
    lines = ["| truth / prediction | " + " | ".join(labels) + " |"]
    lines.append("|---" * (len(labels) + 1) + "|")
    for label, row in zip(labels, counts, strict=True):
        lines.append(f"| {label} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)


def confusion_media(matrix: Any, names: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """A W&B table (rows truth, columns prediction) and chart of a C x C confusion matrix."""
    import wandb

    counts = np.asarray(torch.as_tensor(matrix).cpu().long())
    k = counts.shape[0]
    labels = _labels(k, names)
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


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, over ``fit`` (``ema=true``).

    Lightning's callback updates the average after every optimizer step, validates with it,
    and writes it as every checkpoint's ``state_dict`` (so ``best.ckpt`` is picked by, and
    holds, the averaged weights, and eval, predict and export load them), with the raw weights
    under ``current_model_state`` and its count under ``averaging_state``, tensors all; a
    resumed fit restores both. Two changes, each where it falls short:

    - outside ``fit`` (the validation and test of the best checkpoint after training) it does
      nothing: a checkpoint's ``state_dict`` already is the average. Lightning's would load the
      raw weights into the module there, and ``trainer.test`` would score those;
    - the average lives on the training device: Lightning's takes the module's device at
      ``setup``, which is still the CPU before the strategy moves the module to a GPU; and in
      the memory format the network has there (``module.channels_last``): this setup runs
      before the module's own, which converts the network, so the copy would stay contiguous
      and validation with it would run in the slower format.

    Args:
        decay: the weight of the average at each update (``ema_decay``), in (0, 1).
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__(decay=decay)
        self.decay = decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._average_model = None  # a checkpoint loaded now holds the average already
            return
        self._device = trainer.strategy.root_device
        follow_device = getattr(pl_module, "follow_device", None)  # a covidqu module's
        if callable(follow_device):
            follow_device(self._device)
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is not None:  # outside fit: the module keeps the average
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
