"""Test-time augmentation (``tta=none|flip|flip_scale``): what ``eval``, ``predict`` and
``analyze`` average a model's prediction over.

- ``none``: the model on the image.
- ``flip``: the mean of the model on the image and on its horizontal mirror, the mirror's
  pixel probabilities mirrored back (a class probability needs no mapping back).
- ``flip_scale``: ``flip`` at each of :data:`SCALES`: the image is resized (bilinear), predicted,
  and the pixel probabilities resized back to the image's size (bilinear) before averaging.

Probabilities are averaged, never logits: the mean of two confident logits of opposite signs
says less than either, the mean of their probabilities says "unsure". Training and validation
never use TTA: the module's ``tta`` is set by the commands that evaluate and predict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from covidqu.errors import ConfigError

#: The values of the ``tta`` config key.
TTA_MODES = ("none", "flip", "flip_scale")
#: The scales ``flip_scale`` predicts at (1.0: the image as it is).
SCALES = (0.75, 1.0, 1.25)
#: A rescaled side is rounded to a multiple of this: segmentation-models-pytorch encoders halve
#: the image five times and refuse sides that are not multiples of 32.
SIZE_MULTIPLE = 32


def check_tta(mode: str) -> str:
    """``mode`` if it is one of :data:`TTA_MODES`; a :class:`ConfigError` naming ``tta``."""
    if mode not in TTA_MODES:
        raise ConfigError(f"tta={mode!r} is not one of {', '.join(TTA_MODES)}: e.g. tta=flip")
    return mode


def scaled_side(side: int, scale: float, multiple: int = SIZE_MULTIPLE) -> int:
    """``side * scale`` rounded (half up) to a multiple of ``multiple``, at least ``multiple``;
    the side itself at scale 1."""
    if scale == 1:
        return side
    return max(multiple, int(side * scale / multiple + 0.5) * multiple)


def _flip_mean(
    logits_fn: Callable[[Tensor], Tensor],
    probabilities_fn: Callable[[Tensor], Tensor],
    image: Tensor,
) -> Tensor:
    """The mean of the probabilities of ``image`` and of its mirror, mirrored back; both in one
    call of the network (one batch of twice the size)."""
    n = image.shape[0]
    probs = probabilities_fn(logits_fn(torch.cat([image, image.flip(-1)])).float())
    plain, mirrored = probs[:n], probs[n:]
    if mirrored.dim() == 4:  # pixel probabilities: back to the image's orientation
        mirrored = mirrored.flip(-1)
    return (plain + mirrored) / 2


def tta_probabilities(
    logits_fn: Callable[[Tensor], Tensor],
    probabilities_fn: Callable[[Tensor], Tensor],
    image: Tensor,
    mode: str = "none",
    scales: tuple[float, ...] = SCALES,
    multiple: int = SIZE_MULTIPLE,
) -> Tensor:
    """The probabilities (B x C x H x W or B x C) of a batch of images (B x 1 x H x W) under
    test-time augmentation ``mode``.

    Args:
        logits_fn: the network: ``logits_fn(image)`` gives logits.
        probabilities_fn: logits to probabilities (sigmoid or softmax).
        image: the batch, as the network takes it.
        mode: one of :data:`TTA_MODES`.
        scales: the scales of ``flip_scale``; scales that give the same size once rounded
            (``scaled_side``) count once, so a small image is not weighted twice at one size.
        multiple: what a rescaled side is rounded to.
    """
    check_tta(mode)
    if mode == "none":
        return probabilities_fn(logits_fn(image).float())
    if mode == "flip":
        return _flip_mean(logits_fn, probabilities_fn, image)
    h, w = image.shape[-2:]
    sizes = dict.fromkeys(
        (scaled_side(h, s, multiple), scaled_side(w, s, multiple)) for s in scales
    )
    averaged = []
    for size in sizes:
        x = image
        if size != (h, w):
            x = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
            x = x.to(image.dtype)
        probs = _flip_mean(logits_fn, probabilities_fn, x)
        if probs.dim() == 4 and probs.shape[-2:] != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        averaged.append(probs)
    return torch.stack(averaged).mean(dim=0)
