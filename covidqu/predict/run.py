"""Predicting on arbitrary image files: what ``python -m covidqu.predict`` runs.

Any 8- or 16-bit, gray or colour PNG / JPEG (and BMP / TIFF) of any size is read, converted
to 8-bit gray, resized and normalised exactly as the checkpoint was trained, and predicted. What
is written for each image is the module's to say (:meth:`~covidqu.models.task.TaskContract.
predict_outputs`): segmentation writes ``<name>_mask.png`` at the input's own size (binary:
0 / 255; background / lung / infection: 0 / 128 / 255) and ``<name>_overlay.png``;
classification writes an overlay captioned with the class. ``explain=gradcam`` (a model with
a class head) adds ``<name>_gradcam.png``, the Grad-CAM heatmap of the predicted class over the
image at its own size, and the class it explains in the ``explained`` column
(:mod:`covidqu.models.explain`). ``predictions.csv`` has one row per input, unreadable ones
included with their error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from covidqu.constants import CLASSES
from covidqu.data.badfiles import BadFile
from covidqu.data.layout import DataError
from covidqu.data.loading import loader_workers, worker_init
from covidqu.data.transforms import build_transform
from covidqu.models.checkpoint import preprocessing
from covidqu.models.ensemble import load_model
from covidqu.models.explain import (
    check_explain,
    check_explain_mode,
    explained_classes,
    gradcam_for,
    overlay,
)
from covidqu.models.postprocess import apply_config
from covidqu.models.tta import check_tta
from covidqu.predict.checks import check_required
from covidqu.runtime import outputs
from covidqu.runtime.inputs import (
    as_numpy,
    find_inputs,
    output_names,
    per_image,
    prepare,
    read_input,
    resolve_device,
)

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"


class InputImages(Dataset):
    """The input files, each read, resized and normalised in a loader worker.

    An item is ``(index, input, image)``: the model's input at the checkpoint's size and the
    image at its own size (the mask and overlay are written at it); a file that cannot be read
    gives a :class:`~covidqu.data.badfiles.BadFile` instead, as the training loaders do, so the
    main process reports it (an error raised in a worker would end the run).
    """

    def __init__(self, files: Sequence[Path], image_size: Any, mean: float, std: float) -> None:
        self.files = list(files)
        self.transform = build_transform(image_size)
        self.mean, self.std = float(mean), float(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, np.ndarray] | BadFile:
        path = self.files[index]
        try:
            image = read_input(path)
        except DataError as err:
            return BadFile(path=str(path), problem=str(err))
        return index, prepare(image, self.transform, self.mean, self.std), image


def collate_inputs(items: Sequence[Any]) -> tuple[list[int], torch.Tensor | None, list, list]:
    """``(indices, inputs, images, bad)``: the readable items' inputs stacked (``None`` when
    there are none), their images as they are (sizes differ), and the bad files' markers."""
    bad = [item for item in items if isinstance(item, BadFile)]
    good = [item for item in items if not isinstance(item, BadFile)]
    inputs = torch.stack([x for _, x, _ in good]) if good else None
    return [i for i, _, _ in good], inputs, [img for _, _, img in good], bad


def input_loader(
    files: Sequence[Path], pre: dict[str, Any], batch_size: int, num_workers: int, pin: bool
) -> DataLoader:
    """Batches of ``files`` in order, decoded and resized by ``num_workers`` processes (``0``:
    in this one), at most a few batches ahead of the model."""
    return DataLoader(
        InputImages(files, pre["image_size"], pre["mean"], pre["std"]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_inputs,
        pin_memory=pin,
        worker_init_fn=worker_init if num_workers else None,  # Ctrl-C reaches this process only
    )


def predict(
    ckpt_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    batch_size: int = 16,
    device: str = "auto",
    recursive: bool = False,
    num_workers: int | str = 0,
    progress_bar: bool = True,
    tta: str = "none",
    postprocess: Mapping[str, Any] | None = None,
    explain: str = "none",
) -> list[dict[str, Any]]:
    """Predict every image at ``inputs`` into ``output``; return the rows of predictions.csv.
    ``ckpt_path`` may list several checkpoints: their ensemble (:mod:`covidqu.models.ensemble`).

    The images stream through a DataLoader: a batch is read, predicted and written before the
    ones after it are needed, so memory holds a few batches whatever the number of files. The
    output folder is made with the first readable batch: when no file can be read, it is left
    as it was and a :class:`DataError` names the first problems. ``tta`` is the test-time
    augmentation (:mod:`covidqu.models.tta`); each row of predictions.csv names it, so the file
    says how its masks were made without the run's log. ``postprocess``: the ``postprocess``
    config (default: what the checkpoint records, :mod:`covidqu.models.postprocess`).
    ``explain``: ``none`` or ``gradcam`` (the module docstring).
    """
    check_tta(tta)
    check_explain_mode(explain)
    files = find_inputs(inputs, recursive=recursive)
    device = resolve_device(device)
    module = load_model(ckpt_path, map_location=device)
    check_explain(explain, ckpt_path, type(module), module.recipe.get("task", {}).get("name"))
    gradcam = gradcam_for(module, explain, preprocessing(module))  # refused before any file
    module.tta = tta
    apply_config(module, postprocess)
    steps = getattr(module, "postprocess", None)
    if steps is not None and steps.inside_lung and tuple(module.class_names) == ("infection",):
        log.warning(
            "postprocess.inside_lung needs a lung, which a binary infection model does not "
            "predict: its masks are not restricted to the lung here (covidqu.analyze with "
            "lung_ckpt= does it)"
        )
    out = Path(output).expanduser()
    names = output_names(files)
    loader = input_loader(
        files,
        preprocessing(module),
        batch_size,
        loader_workers(num_workers),  # auto: fitted to the cores
        pin=device.startswith("cuda"),
    )
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(files),
        desc="predict",
        unit="img",
        disable=None if progress_bar else True,  # None: only on a terminal
        dynamic_ncols=True,
    )
    with bar, torch.inference_mode():
        for indices, x, images, bad in loader:
            for item in bad:
                log.error("skipped %s: %s", item.path, item.problem)
                rows.append({"file": item.path, "status": f"error: {item.problem}"})
            if x is not None:
                out.mkdir(parents=True, exist_ok=True)
                x = x.to(device, non_blocking=True)
                batch = module.predict_probabilities(x)
                probs = per_image(as_numpy(batch))
                if gradcam is not None:
                    explained = explained_classes(module, batch)
                    heatmaps = gradcam(x, explained)
                for j, (i, image, p) in enumerate(zip(indices, images, probs, strict=True)):
                    f = files[i]
                    fields, pictures = module.predict_outputs(image, p)
                    if gradcam is not None:
                        fields["explained"] = CLASSES[explained[j]]
                        pictures["gradcam"] = overlay(image, heatmaps[j])
                    for suffix, picture in pictures.items():
                        outputs.write_png(out / f"{names[f]}_{suffix}.png", picture)
                    rows.append({"file": str(f), "status": "ok", **fields, "tta": tta})
            bar.update(len(indices) + len(bad))
    failed = sum(1 for r in rows if r["status"] != "ok")
    if failed == len(rows):  # nothing predicted: the output folder is as it was
        raise DataError(
            f"input={inputs}: none of its {len(files)} image file(s) can be read: "
            + "; ".join(r["status"].removeprefix("error: ") for r in rows[:3])
        )
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["file"]])
    outputs.write_rows(out / PREDICTIONS_FILE, rows)
    log.info(
        "predicted %d of %d images into %s (%d unreadable), tta=%s",
        len(rows) - failed,
        len(rows),
        out,
        failed,
        tta,
    )
    return rows


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``predict`` with the keys of ``conf/predict.yaml``."""
    check_required(cfg)
    return predict(
        cfg["ckpt_path"],
        cfg["input"],
        cfg["output"],
        batch_size=cfg["batch_size"],
        device=cfg["device"],
        recursive=cfg["recursive"],
        num_workers=cfg["num_workers"],
        progress_bar=cfg["progress_bar"],
        tta=cfg.get("tta", "none"),
        postprocess=cfg.get("postprocess"),
        explain=cfg.get("explain", "none"),
    )
