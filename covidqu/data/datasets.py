"""The torch Dataset over index samples, giving the batch contract of :mod:`covidqu.constants`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from covidqu.constants import SUBSET_MASKS, target_info
from covidqu.data.badfiles import BadFile
from covidqu.data.layout import DataError, Sample
from covidqu.data.readers import PngReader, SampleReader
from covidqu.errors import ConfigError

if TYPE_CHECKING:
    import albumentations as A  # only the pipeline's type: the pipeline is built elsewhere

#: Mean and std of the gray level over ImageNet's three channels, so that a single-channel input
#: matches what ImageNet-pretrained encoders (their first conv summed over RGB) expect.
DEFAULT_MEAN = 0.449
DEFAULT_STD = 0.226


def normalise(image: np.ndarray, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> Tensor:
    """A 2-D uint8 image as the float32 1 x H x W model input: ``(x / 255 - mean) / std``."""
    return scale_(torch.from_numpy(np.ascontiguousarray(image)).float(), mean, std).unsqueeze(0)


def scale_(x: Tensor, mean: float, std: float) -> Tensor:
    """``(x / 255 - mean) / std`` in place on a float tensor of 8-bit values, in one multiply
    and one subtract (not three steps): every image of every epoch passes here."""
    return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)


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
        target: what ``mask`` holds, a name of :data:`covidqu.constants.TARGETS` (``lung``,
            ``infection``, ``infection_multiclass``, ...); its masks must be in the samples'
            subset.
        transform: an albumentations pipeline applied to the image and every mask at once
            (:func:`covidqu.data.transforms.build_transform`); ``None`` keeps the stored size.
        reader: where pixels come from; defaults to decoding the PNG files.
        mean, std: normalisation of the [0, 1] gray level.
        mark_bad_files: give a :class:`~covidqu.data.badfiles.BadFile` in place of a sample whose
            file cannot be read, instead of raising; for a
            :class:`~covidqu.data.badfiles.BadFileLoader`, which decides in the main process.
        as_uint8: give ``image``, ``mask`` and ``lung`` as uint8 (the image as stored, not
            normalised), a quarter of the bytes to move between processes and to the device;
            :func:`finish_batch` then makes the batch contract's tensors there.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        target: str = "lung",
        transform: A.Compose | None = None,
        reader: SampleReader | None = None,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
        mark_bad_files: bool = False,
        as_uint8: bool = False,
    ) -> None:
        spec = target_info(target)
        lacking = [s for s in samples if not set(spec.masks) <= set(SUBSET_MASKS[s.subset])]
        if lacking:
            raise DataError(
                f"data.target={target} needs {' and '.join(spec.masks)} masks, but "
                f"{len(lacking)} sample(s) come from the {lacking[0].subset} subset (e.g. "
                f"{lacking[0].image}); use data={spec.subset}"
            )
        if std <= 0:
            raise ValueError(f"data.std must be positive, got {std}")
        self.samples = list(samples)
        self.target = target
        self.transform = transform
        self.reader = reader if reader is not None else PngReader()
        self.mean = float(mean)
        self.std = float(std)
        self.spec = spec
        self.mark_bad_files = mark_bad_files
        self.as_uint8 = as_uint8
        #: The masks to read: the target's, and the lung mask for severity whenever the target
        #: is something else (see the batch contract).
        self.mask_kinds = tuple(dict.fromkeys((*spec.masks, "lung")))
        self._with_lung = spec.masks != ("lung",)
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

    def __getitem__(self, i: int) -> dict[str, Any] | BadFile:
        try:
            return self._item(self.samples[i])
        except DataError as err:
            if not self.mark_bad_files:
                raise
            path = getattr(err, "path", None) or str(self.samples[i].image)
            return BadFile(path=path, problem=str(err))

    def _item(self, sample: Sample) -> dict[str, Any]:
        image = self.reader.image(sample)
        masks = [self.reader.mask(sample, kind) for kind in self.mask_kinds]
        for kind, m in zip(self.mask_kinds, masks, strict=True):
            if m.shape != image.shape:
                raise DataError(
                    f"mask {sample.mask(kind)} is {m.shape[0]}x{m.shape[1]} but its image "
                    f"{sample.image} is {image.shape[0]}x{image.shape[1]}; the pair must have the "
                    "same size"
                )
        if self.transform is not None:
            self._reseed_transform()
            out = self.transform(image=image, masks=masks)
            image, masks = out["image"], out["masks"]

        by_kind = {
            kind: torch.from_numpy(np.ascontiguousarray(m))
            for kind, m in zip(self.mask_kinds, masks, strict=True)
        }
        if self.as_uint8:
            x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
        else:
            x = normalise(image, self.mean, self.std)
        item: dict[str, Any] = {"image": x, "label": sample.label, "id": sample.id}
        item["mask"] = target_mask(self.spec.masks, by_kind, self.as_uint8)
        if self._with_lung:
            lung = by_kind["lung"].unsqueeze(0)
            item["lung"] = lung if self.as_uint8 else lung.float()
        return item


def target_mask(
    kinds: Sequence[str], masks: Mapping[str, Tensor], as_uint8: bool = False
) -> Tensor:
    """The ``mask`` of a target made of ``kinds`` (see :class:`covidqu.constants.Target`).

    One kind: that mask as float32 1 x H x W. Several: int64 H x W class indices, class ``k``
    where ``kinds[k - 1]`` is set and no later kind is, 0 elsewhere. ``as_uint8``: the same
    values as uint8, for :func:`finish_batch`.
    """
    if len(kinds) == 1:
        mask = masks[kinds[0]].unsqueeze(0)
        return mask if as_uint8 else mask.float()
    label = torch.zeros_like(masks[kinds[0]], dtype=torch.uint8 if as_uint8 else torch.long)
    for k, kind in enumerate(kinds, start=1):
        label[masks[kind] > 0] = k
    return label


def check_normalise(normalise: str) -> str:
    """``data.normalise`` as given, once known to be one of ``loader``, ``device``, ``auto``."""
    if normalise not in ("loader", "device", "auto"):
        raise ConfigError(
            f"data.normalise={normalise!r} is not one of loader|device|auto: 'loader' makes "
            "float batches in the loader workers, 'device' sends uint8 batches and makes them "
            "float on the training device, 'auto' does so for batches of the packed cache"
        )
    return normalise


def finish_batch(batch: dict[str, Any], mean: float, std: float) -> dict[str, Any]:
    """A batch of a dataset made ``as_uint8`` as the batch contract has it, where it lies (on
    the training device, after a transfer of a quarter of the bytes): the image normalised
    exactly as :func:`normalise` does, a one-kind mask and ``lung`` float32, class indices int64.
    """
    out = dict(batch)
    out["image"] = scale_(batch["image"].float(), mean, std)
    mask = batch["mask"]
    out["mask"] = mask.float() if mask.dim() == 4 else mask.long()
    if "lung" in batch:
        out["lung"] = batch["lung"].float()
    return out
