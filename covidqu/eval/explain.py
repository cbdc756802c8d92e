"""``eval explain=gradcam``: a Grad-CAM heatmap of each evaluated image's predicted class.

Written during the test loop, batch by batch, as Lightning hands each one to the module (no
second pass over the split, and no map kept in memory): ``gradcam/<id>.png`` (the image at the
network's input size under the heatmap, :mod:`covidqu.models.explain`) and ``gradcam.csv``, one
row per image: ``id``, ``class`` (the truth), ``explained`` (the class predicted and explained)
and ``file``. On several processes each writes the files of its own shard, and the first writes
the rows of all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from covidqu.constants import CLASSES
from covidqu.models.explain import GradCam, explained_classes, overlay
from covidqu.models.figures import denormalise
from covidqu.models.kept import gather_rows
from covidqu.runtime import outputs

#: The folder of the heatmaps in an eval run folder, and the table beside it.
GRADCAM_DIR = "gradcam"
GRADCAM_FILE = "gradcam.csv"


class GradCamWriter(pl.Callback):
    """Writes the Grad-CAM heatmap of each test batch's images into ``out_dir``."""

    def __init__(self, gradcam: GradCam, out_dir: Path) -> None:
        self.gradcam = gradcam
        self.folder = Path(out_dir) / GRADCAM_DIR
        self.out_dir = Path(out_dir)
        self.rows: list[dict[str, Any]] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.rows = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        outputs_: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch is None:  # data.on_bad_file=skip: no readable image in it
            return
        x = batch["image"]
        with torch.no_grad():  # the class the test step predicted (TTA, temperature)
            explained = explained_classes(pl_module, pl_module.predict_probabilities(x))
        heatmaps = self.gradcam(x, explained)
        images = denormalise(x[:, 0].float().cpu().numpy(), *pl_module.normalisation)
        self.folder.mkdir(parents=True, exist_ok=True)
        labels = batch["label"].tolist()
        for i, image_id in enumerate(batch["id"]):
            name = f"{outputs.safe_name(image_id)}.png"
            outputs.write_png(self.folder / name, overlay(images[i], heatmaps[i]))
            self.rows.append(
                {
                    "id": image_id,
                    "class": CLASSES[labels[i]],
                    "explained": CLASSES[explained[i]],
                    "file": f"{GRADCAM_DIR}/{name}",
                }
            )

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        rows = gather_rows(self.rows)
        if trainer.is_global_zero and rows:
            outputs.write_rows(self.out_dir / GRADCAM_FILE, rows)
