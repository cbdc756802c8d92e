"""Predicting on arbitrary image files: what ``python -m covidqu.predict`` runs.

Any 8- or 16-bit, gray or colour PNG / JPEG (and BMP / TIFF) of any size is read, converted
to 8-bit gray, resized and normalised exactly as the checkpoint was trained, and predicted. What
is written for each image is the module's to say (:meth:`~covidqu.models.base.CXRModule.
predict_outputs`): segmentation writes ``<name>_mask.png`` at the input's own size (binary:
0 / 255; background / lung / infection: 0 / 128 / 255) and ``<name>_overlay.png``;
classification writes an overlay captioned with the class. ``predictions.csv`` has one row per
input, unreadable ones included with their error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidqu.data.datasets import normalise
from covidqu.data.layout import DataError
from covidqu.data.readers import read_image
from covidqu.data.transforms import build_transform
from covidqu.errors import MissingFileError
from covidqu.models.checkpoint import load_module, preprocessing
from covidqu.pipeline import outputs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PREDICTIONS_FILE = "predictions.csv"
#: The smallest side of an input image: below it there is no lung to see (an icon, a pixel).
MIN_SIDE = 16


def find_inputs(path: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """The image files at ``path``: the file itself, or those in the folder, sorted."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise MissingFileError(f"input={p} does not exist; give an image file or a folder")
    found = p.rglob("*") if recursive else p.iterdir()
    files = sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MissingFileError(
            f"input={p} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
            + ("" if recursive else "; add recursive=true to look into sub-folders")
        )
    return files


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resolve_device(device: str) -> str:
    """``auto``: the GPU where there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def probabilities(module: Any, images: Sequence[np.ndarray], device: str) -> np.ndarray:
    """The module's probabilities (B x C x h x w or B x C) for 2-D uint8 images of any size,
    resized and normalised as the checkpoint's evaluation split was."""
    pre = preprocessing(module)
    resize = build_transform(pre["image_size"])
    mean, std = float(pre["mean"]), float(pre["std"])
    x = torch.stack([normalise(resize(image=img)["image"], mean, std) for img in images])
    with torch.inference_mode():
        return module.probabilities(module(x.to(device)).float()).cpu().numpy()


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """A unique output stem per input (``a.png`` beside ``a.jpg`` gives ``a`` and ``a-2``)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for f in files:
        base = outputs.safe_name(f.stem)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        names[f] = name
    return names


def read_inputs(files: Sequence[Path]) -> tuple[list[tuple[Path, np.ndarray]], list[dict]]:
    """The readable images (8-bit gray) with their files, and a row for each file that is not
    (``status: error: ...``), logged and skipped."""
    readable: list[tuple[Path, np.ndarray]] = []
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            image = read_image(f)
            if min(image.shape) < MIN_SIDE:
                raise DataError(
                    f"{f} is {image.shape[1]}x{image.shape[0]} px, too small for a chest X-ray "
                    f"(at least {MIN_SIDE} px a side)"
                )
            readable.append((f, image))
        except DataError as err:
            log.error("skipped %s: %s", f, err)
            rows.append({"file": str(f), "status": f"error: {err}"})
    return readable, rows


def predict(
    ckpt_path: str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    batch_size: int = 16,
    device: str = "auto",
    recursive: bool = False,
) -> list[dict[str, Any]]:
    """Predict every image at ``inputs`` into ``output``; return the rows of predictions.csv."""
    files = find_inputs(inputs, recursive=recursive)
    readable, rows = read_inputs(files)
    if not readable:  # nothing to predict: leave the output folder as it was
        raise DataError(
            f"input={inputs}: none of its {len(files)} image file(s) can be read: "
            + "; ".join(r["status"].removeprefix("error: ") for r in rows[:3])
        )
    device = resolve_device(device)
    module = load_module(ckpt_path, map_location=device)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files)

    for batch in batches(readable, batch_size):
        probs = probabilities(module, [img for _, img in batch], device)
        for (f, img), p in zip(batch, probs, strict=True):
            fields, pictures = module.predict_outputs(img, p)
            for suffix, picture in pictures.items():
                outputs.write_png(out / f"{names[f]}_{suffix}.png", picture)
            rows.append({"file": str(f), "status": "ok", **fields})
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["file"]])
    outputs.write_rows(out / PREDICTIONS_FILE, rows)
    failed = sum(1 for r in rows if r["status"] != "ok")
    log.info(
        "predicted %d of %d images into %s (%d unreadable)",
        len(rows) - failed,
        len(rows),
        out,
        failed,
    )
    return rows
