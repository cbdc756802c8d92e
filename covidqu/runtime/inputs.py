"""Images a user hands a command (``input=``): finding them, reading them, and a module's
probabilities for them, prepared exactly as the checkpoint's evaluation split was.

``predict`` and ``analyze`` take the same inputs the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidqu.data.datasets import normalise
from covidqu.data.layout import DataError
from covidqu.data.readers import read_image
from covidqu.data.transforms import build_transform
from covidqu.errors import MissingFileError
from covidqu.models.checkpoint import preprocessing
from covidqu.runtime import outputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
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


def resolve_device(device: str) -> str:
    """``auto``: the GPU where there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def prepare(image: np.ndarray, transform: Any, mean: float, std: float) -> torch.Tensor:
    """A 2-D uint8 image as the model's 1 x H x W input: resized by ``transform`` (see
    :func:`covidqu.data.transforms.build_transform`) and normalised, as in evaluation."""
    return normalise(transform(image=image)["image"], mean, std)


def probabilities(module: Any, images: Sequence[np.ndarray], device: str) -> Any:
    """The module's probabilities (B x C x h x w or B x C; a tuple of both for a network with a
    classification head) for 2-D uint8 images of any size, resized and normalised as the
    checkpoint's evaluation split was, averaged over the module's test-time augmentation
    (``module.tta``)."""
    pre = preprocessing(module)
    resize = build_transform(pre["image_size"])
    mean, std = float(pre["mean"]), float(pre["std"])
    x = torch.stack([prepare(img, resize, mean, std) for img in images])
    with torch.inference_mode():
        return as_numpy(module.predict_probabilities(x.to(device)))


def as_numpy(probs: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
    """A batch's probabilities as numpy: one array, or a tuple of arrays for a network with two
    outputs (``task=multitask``: pixel, then class probabilities)."""
    if isinstance(probs, tuple):
        return tuple(p.cpu().numpy() for p in probs)
    return probs.cpu().numpy()


def per_image(probs: Any) -> list[Any]:
    """:func:`as_numpy`'s batch as one item per image (an array, or a tuple of arrays)."""
    if isinstance(probs, tuple):
        return list(zip(*probs, strict=True))
    return list(probs)


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


def read_input(path: Path) -> np.ndarray:
    """An input file as a 2-D uint8 image; a :class:`DataError` naming it if it cannot be one."""
    image = read_image(path)
    if min(image.shape) < MIN_SIDE:
        raise DataError(
            f"{path} is {image.shape[1]}x{image.shape[0]} px, too small for a chest X-ray "
            f"(at least {MIN_SIDE} px a side)"
        )
    return image
