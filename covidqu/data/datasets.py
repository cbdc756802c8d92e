"""The torch Dataset over index samples, giving the batch contract of :mod:`covidqu.constants`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from covidqu.constants import TARGETS
from covidqu.data.layout import DataError, Sample
from covidqu.data.readers import PngReader, SampleReader

#: Mean and std of the gray level over ImageNet's three channels, so that a single-channel input
#: matches what ImageNet-pretrained encoders (their first conv summed over RGB) expect.
DEFAULT_MEAN = 0.449
DEFAULT_STD = 0.226


def normalise(image: np.ndarray, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> Tensor:
    """A 2-D uint8 image as the float32 1 x H x W model input: ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    return x.div_(255.0).sub_(mean).div_(std).unsqueeze(0)


def _process_rank() -> int:
    """This process's global rank under ``torch.distributed`` (0 outside it); forked
    DataLoader workers inherit their parent's."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class CXRDataset(Dataset):
    """Images and masks of ``samples``, transformed together, as dicts of tensors.

    Args:
        samples: index samples, all from one subset (see :func:`covidqu.data.layout.scan`).
        target: what ``mask`` holds: ``lung`` (binary lung mask), ``infection`` (binary
            infection mask) or ``infection_multiclass`` (0 background / 1 lung / 2 infection).
            Infection targets need infection-subset samples.
        transform: an albumentations pipeline applied to the image and every mask at once
            (:func:`covidqu.data.transforms.build_transform`); ``None`` keeps the stored size.
        reader: where pixels come from; defaults to decoding the PNG files.
        mean, std: normalisation of the [0, 1] gray level.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        target: str = "lung",
        transform: A.Compose | None = None,
        reader: SampleReader | None = None,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"data.target={target!r} is not one of {TARGETS}")
        if target != "lung":
            lacking = [s for s in samples if s.infection_mask is None]
            if lacking:
                raise DataError(
                    f"data.target={target} needs infection masks, but {len(lacking)} sample(s) "
                    f"come from the {lacking[0].subset} subset (e.g. {lacking[0].image}); "
                    "use data=infection"
                )
        if std <= 0:
            raise ValueError(f"data.std must be positive, got {std}")
        self.samples = list(samples)
        self.target = target
        self.transform = transform
        self.reader = reader if reader is not None else PngReader()
        self.mean = float(mean)
        self.std = float(std)
        self._with_infection = target != "lung"
        self._seeded_with: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def _reseed_transform(self) -> None:
        """Give each process, each DataLoader worker, and each epoch's workers their own
        augmentation stream.

        An albumentations pipeline draws from its own generator, copied as is into every forked
        worker: left alone, all workers (and, without persistent workers, all epochs) would
        replay the same augmentations. ``torch.initial_seed()`` differs per worker and per
        epoch, and follows ``seed_everything``, so runs stay reproducible. It does not differ
        between DDP processes that load in their main process (``data.num_workers=0``) after
        ``seed_everything``: the process's rank joins it in the seed.
        """
        key = (torch.initial_seed(), _process_rank())
        if self.transform is not None and key != self._seeded_with:
            self.transform.set_random_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
            self._seeded_with = key

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        image = self.reader.image(sample)
        masks = [self.reader.lung_mask(sample)]
        if self._with_infection:
            masks.append(self.reader.infection_mask(sample))
        for path, m in zip((sample.lung_mask, sample.infection_mask), masks, strict=False):
            if m.shape != image.shape:
                raise DataError(
                    f"mask {path} is {m.shape[0]}x{m.shape[1]} but its image {sample.image} is "
                    f"{image.shape[0]}x{image.shape[1]}; the pair must have the same size"
                )
        if self.transform is not None:
            self._reseed_transform()
            out = self.transform(image=image, masks=masks)
            image, masks = out["image"], out["masks"]

        x = normalise(image, self.mean, self.std)
        lung = torch.from_numpy(np.ascontiguousarray(masks[0]))
        item: dict[str, Any] = {"image": x, "label": sample.label, "id": sample.id}
        if self.target == "lung":
            item["mask"] = lung.float().unsqueeze(0)
            return item
        infection = torch.from_numpy(np.ascontiguousarray(masks[1]))
        if self.target == "infection":
            item["mask"] = infection.float().unsqueeze(0)
        else:
            item["mask"] = (lung.bool() | infection.bool()).long() + infection.long()
        item["lung"] = lung.float().unsqueeze(0)
        return item
