"""Albumentations pipelines: resize for every split, augmentations for training only.

The augmentations come from the ``augment`` config group (``conf/augment/{none,light,strong}``)
as a list of albumentations transforms. Every pipeline is applied to the image and all masks of a
sample in one call, so geometry stays aligned; masks are resampled with nearest-neighbour.
``augment=gpu_light|gpu_strong`` leave that list empty and augment whole batches on the training
device instead (:mod:`covidqu.data.device_augment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2

if TYPE_CHECKING:
    import albumentations as A


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(v) for v in image_size)
    if h < 8 or w < 8:
        raise ValueError(f"data.image_size={image_size} is too small; use at least 8 pixels")
    return h, w


def build_transform(
    image_size: int | Sequence[int],
    augment: Sequence[A.BasicTransform] | None = None,
    seed: int | None = None,
    resize: bool = True,
) -> A.Compose:
    """Resize to ``image_size`` (an int or ``[height, width]``), then apply ``augment`` if given.

    Resizing comes first so that augmentations work on the size the model sees (cheaper, and
    their pixel parameters mean the same whatever the source size). ``resize=False`` leaves it
    out, for pixels already at ``image_size`` (a packed cache), where it would only copy them.
    """
    # On use: albumentations takes a quarter second to import, which commands that never build
    # a pipeline (``--help``, ``inspect``) should not pay.
    import albumentations as A

    h, w = _size(image_size)
    steps: list[A.BasicTransform] = []
    if resize:
        steps.append(
            A.Resize(
                h,
                w,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                area_for_downscale="image",
            )
        )
    steps += list(augment or [])
    return A.Compose(steps, seed=seed, mask_interpolation=cv2.INTER_NEAREST)
