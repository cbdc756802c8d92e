"""Test-time augmentation (``tta=none|flip|flip_scale``): what ``eval``, ``predict`` and
``analyze`` average a model's prediction over.

- ``none``: the model on the image.
- ``flip``: the mean of the model on the image and on its horizontal mirror, the mirror's
  pixel probabilities mirrored back (a class probability needs no mapping back).
- ``flip_scale``: ``flip`` at each of :data:`SCALES`: the image is resized (bilinear), predicted,
  and the pixel probabilities resized back to the image's size (bilinear) before averaging.

A network with two outputs (``task=multitask``: pixel and class probabilities) gives a tuple;
each output goes through the same augmentation, by its own rule (4-D: mapped back; 2-D: as is).

Probabilities are averaged, never logits: the mean of two confident logits of opposite signs
says less than either, the mean of their probabilities says "unsure". Training and validation
never use TTA: the module's ``tta`` is set by the commands that evaluate and predict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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


#: A network's output: one tensor, or a tuple of them (pixel and class probabilities).
Out = TypeVar("Out", Tensor, tuple[Tensor, ...])


def _each(fn: Callable[..., Tensor], *outputs: Out) -> Out:
    """``fn`` applied to one output, or to each of a tuple of outputs (element-wise across
    ``outputs``), keeping the shape of the output."""
    if isinstance(outputs[0], tuple):
        return tuple(fn(*parts) for parts in zip(*outputs, strict=True))
    return fn(*outputs)


def _float(x: Tensor) -> Tensor:
    return x.float()


def _unflip(pair: Tensor, n: int) -> Tensor:
    """The mean of the first ``n`` rows and of the mirrored rest mirrored back (pixel
    probabilities; a class probability needs no mapping back)."""
    plain, mirrored = pair[:n], pair[n:]
    if mirrored.dim() == 4:
        mirrored = mirrored.flip(-1)
    return (plain + mirrored) / 2


def _flip_mean(
    logits_fn: Callable[[Tensor], Out],
    probabilities_fn: Callable[[Out], Out],
    image: Tensor,
) -> Out:
    """The mean of the probabilities of ``image`` and of its mirror, mirrored back; both in one
    call of the network (one batch of twice the size)."""
    n = image.shape[0]
    probs = probabilities_fn(_each(_float, logits_fn(torch.cat([image, image.flip(-1)]))))
    return _each(lambda p: _unflip(p, n), probs)


def tta_probabilities(
    logits_fn: Callable[[Tensor], Out],
    probabilities_fn: Callable[[Out], Out],
    image: Tensor,
    mode: str = "none",
    scales: tuple[float, ...] = SCALES,
    multiple: int = SIZE_MULTIPLE,
) -> Out:
    """The probabilities (B x C x H x W or B x C, or a tuple of both) of a batch of images
    (B x 1 x H x W) under test-time augmentation ``mode``.

    Args:
        logits_fn: the network: ``logits_fn(image)`` gives logits (or a tuple of them).
        probabilities_fn: logits to probabilities (sigmoid or softmax; each of a tuple).
        image: the batch, as the network takes it.
        mode: one of :data:`TTA_MODES`.
        scales: the scales of ``flip_scale``; scales that give the same size once rounded
            (``scaled_side``) count once, so a small image is not weighted twice at one size.
        multiple: what a rescaled side is rounded to.
    """
    check_tta(mode)
    if mode == "none":
        return probabilities_fn(_each(_float, logits_fn(image)))
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
        averaged.append(
            _each(lambda p: _resized(p, h, w), _flip_mean(logits_fn, probabilities_fn, x))
        )
    return _each(lambda *ps: torch.stack(ps).mean(dim=0), *averaged)


def _resized(probs: Tensor, h: int, w: int) -> Tensor:
    """Pixel probabilities back at the image's size (bilinear); class probabilities as they are."""
    if probs.dim() == 4 and probs.shape[-2:] != (h, w):
        return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    return probs
