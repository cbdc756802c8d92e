"""LightningDataModules over the official Train / Val / Test splits of each subset, or over K
folds of Train + Val (``data.num_folds``, :mod:`covidqu.data.folds`) with the official Test.

:class:`LungDataModule` serves the lung subset (33,920 CXRs with lung masks);
:class:`InfectionDataModule` the infection subset (5,826 CXRs with lung and infection masks).

Under DDP, :meth:`~COVIDQUDataModule.prepare_data` runs once per node and refuses a bad tree
before any process starts training; :meth:`~COVIDQUDataModule.setup` then lists the folders in
every process. Listing is read-only and takes well under a second for the whole dataset, so it
neither races nor loads the disk. Batch size is per process (per device).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import albumentations as A
import pytorch_lightning as pl
import torch

from covidqu.constants import SPLITS, subset_targets
from covidqu.data.badfiles import BadFileLoader, BadFileLog
from covidqu.data.cache import cache_root, check_cache_setting, choose_cache, progress_bar
from covidqu.data.datasets import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    CXRDataset,
    check_normalise,
    finish_batch,
)
from covidqu.data.folds import check_fold_keys
from covidqu.data.layout import (
    SPLIT_DIRS,
    DataError,
    Index,
    Sample,
    cap_per_class,
    resolve_data_root,
    scan,
)
from covidqu.data.loading import ResumableLoader, build_loader, loader_workers, trains_on_cuda
from covidqu.data.readers import PngReader, SampleReader, build_reader
from covidqu.data.transforms import _size, build_transform
from covidqu.errors import ConfigError


class COVIDQUDataModule(pl.LightningDataModule):
    """What both subsets share; use :class:`LungDataModule` or :class:`InfectionDataModule`.

    Args:
        root: the extracted archive, a subset folder or its inner folder; ``None`` reads the
            ``COVIDQU_ROOT`` environment variable.
        target: what a batch's ``mask`` holds (see :class:`~covidqu.data.datasets.CXRDataset`);
            ``None`` takes the subset's own (``lung`` / ``infection``).
        image_size: side (or ``[height, width]``) every split is resized to.
        batch_size: samples per batch *per device*; evaluation uses ``eval_batch_size`` if set.
        num_workers: DataLoader worker processes per device, or ``auto`` (:func:`loader_workers`).
        pin_memory: page-locked host batches for faster GPU copies (ignored without CUDA).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        balanced_sampler: draw training samples with equal probability per class (with
            replacement, ``len(train)`` per epoch); under DDP each process draws its share.
        limit_per_class: at most this many samples per class of each split, for quick runs: an
            int for every split or a mapping ``{train: 100, val: 20}``; ``null`` for all.
        augment: albumentations transforms for the training split (the ``augment`` group).
        mean, std: normalisation of the [0, 1] gray level.
        reader: how pixels are read: a name from :data:`covidqu.data.readers.READERS` or a
            :class:`~covidqu.data.readers.SampleReader`.
        seed: seed of the per-class cap and, with the epoch, of the training order (shuffle
            or balanced draw), so that a run resumed mid-epoch sees the batches it would have.
        drop_last: drop the last incomplete training batch (a batch of one breaks batch
            norm), unless the split is smaller than one batch.
        on_bad_file: what a file that cannot be read during the run does: ``error`` stops the
            run naming it, ``skip`` leaves the sample out of its batch and goes on (see
            :mod:`covidqu.data.badfiles`; :meth:`skipped_files` lists them).
        cache: ``none`` decodes the PNG files every epoch; ``packed`` decodes each split once
            into memory-mapped arrays under ``cache_dir`` (:mod:`covidqu.data.packed`), read
            through the reader seam with the same batches; ``auto`` packs where it can
            (:func:`~covidqu.data.cache.choose_cache`); ``None``: ``auto`` on a GPU, else
            ``none``. :attr:`cache` says what was chosen once :meth:`setup` ran.
        cache_dir: where ``packed`` keeps its arrays; ``None`` is ``paths.cache_dir``'s default.
        num_folds: ``None`` for the official Train / Val splits; K (>= 2) to pool Train + Val
            and re-split them into K folds, stratified by class and keeping near-duplicates in
            one fold (:mod:`covidqu.data.folds`); Test stays the official one.
        fold: with ``num_folds``, the fold (0 ... K - 1) that is the validation split; the
            others are the training split.
        fold_seed: seed of the fold assignment, apart from ``seed`` so that the folds of a
            sweep stay put whatever the training seed.
        duplicate_distance: Hamming distance (of the 256-bit pHash) up to which two images are
            near-duplicates for the folds; ``None`` for the default of ``duplicates``.
        normalise: where batches become float: ``loader`` (in the workers: the batch
            contract's tensors), ``device`` (uint8 image and masks, a quarter of the bytes to
            pass between processes and copy to the GPU, made the same float tensors by
            :meth:`on_after_batch_transfer`) or ``auto``: ``device`` from the packed cache,
            ``loader`` from PNG files (whose decoding, not the bytes, bounds the loader).
        device_augment: augmentation of whole training batches on the training device
            (:class:`~covidqu.data.device_augment.BatchAugment`, ``augment.device``), applied
            after transfer, in training only; it replaces ``augment``, never adds to it.
    """

    subset: ClassVar[str]

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        target: str | None = None,
        image_size: int | Sequence[int] = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        balanced_sampler: bool = False,
        limit_per_class: int | Mapping[str, int | None] | None = None,
        augment: Sequence[A.BasicTransform] | None = None,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
        reader: str | SampleReader = "png",
        seed: int = 0,
        drop_last: bool = True,
        on_bad_file: str = "error",
        cache: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device_augment: Callable[..., dict[str, Any]] | None = None,
        normalise: str = "auto",
        num_folds: int | None = None,
        fold: int | None = None,
        fold_seed: int = 0,
        duplicate_distance: int | None = None,
    ) -> None:
        super().__init__()
        check_fold_keys(num_folds, fold)
        target = target or self.targets[0]
        if target not in self.targets:
            raise ValueError(
                f"data.target={target!r} is not served by the {self.subset} subset; "
                f"choose one of {self.targets}"
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.workers_setting = num_workers  # auto: counted again per device in setup()
        num_workers = loader_workers(num_workers)
        if augment and device_augment is not None:
            raise ConfigError(
                "augment.train and augment.device are both set: every training batch would be "
                "augmented twice, per sample in the loader and again on the device. Use one: "
                "augment=gpu_light|gpu_strong (augment.train=[]) or augment=light|strong "
                "(augment.device=null)."
            )
        self.save_hyperparameters(ignore=["augment", "reader", "device_augment"])
        self.root = None if root in (None, "") else Path(root).expanduser()
        self.target = target
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.balanced_sampler = balanced_sampler
        self.limits = self._limits(limit_per_class)
        self.augment = list(augment or [])
        self.mean, self.std = float(mean), float(std)
        self.reader = build_reader(reader)
        self.seed = seed
        self.drop_last = drop_last
        self.bad_files = BadFileLog(on_bad_file)
        self.device_augment = device_augment
        self.normalise_setting = check_normalise(normalise)
        self.normalise = "loader" if normalise == "auto" else normalise
        self.num_folds, self.fold, self.fold_seed = num_folds, fold, fold_seed
        self.duplicate_distance = duplicate_distance
        self._fold_samples: dict[str, list[Sample]] | None = None
        build_transform(image_size)  # validate the size now, not in a worker
        self.index: Index | None = None
        self.datasets: dict[str, CXRDataset] = {}
        self._train_loader: ResumableLoader | None = None
        self._train_position: dict[str, int] | None = None
        self.cache_setting = check_cache_setting(cache, isinstance(self.reader, PngReader))
        #: What the run reads, ``none`` or ``packed``, once :meth:`setup` chose; until then the
        #: setting as given.
        self.cache, self.cache_dir = cache, cache_dir
        self._cache_chosen = False

    @property
    def targets(self) -> tuple[str, ...]:
        """The ``data.target`` values this subset serves, its default first."""
        return subset_targets(self.subset)

    @staticmethod
    def _limits(limit: int | Mapping[str, int | None] | None) -> dict[str, int | None]:
        if limit is None or isinstance(limit, int):
            return dict.fromkeys(SPLITS, limit)
        unknown = set(limit) - set(SPLITS)
        if unknown:
            raise ValueError(
                f"data.limit_per_class has unknown split(s) {sorted(unknown)}; use {SPLITS}"
            )
        return {s: limit.get(s) for s in SPLITS}

    # -- index ---------------------------------------------------------------------------------

    def scan(self) -> Index:
        """List this subset under the root and refuse structural problems (orphans, folders)."""
        root = resolve_data_root(self.root)
        index = scan(root, subsets=[self.subset])
        index.raise_on_problems(self.subset)
        if not index.samples:
            raise DataError(
                f"no images in the {self.subset} subset at {index.subset_dirs[self.subset]}: "
                f"expected {'/'.join(SPLIT_DIRS.values())}/<class>/images/*.png under it"
            )
        return index

    def split_samples(self, split: str) -> list[Sample]:
        """The (capped) samples of ``split``; an error naming the folder when it is empty."""
        if self.index is None:
            self.index = self.scan()
        if self.num_folds is not None and split in ("train", "val"):
            samples = self.folds(self.index)[split]
        else:
            samples = self.index.select(subset=self.subset, split=split)
        if not samples:
            folder = self.index.subset_dirs[self.subset] / SPLIT_DIRS[split]
            raise DataError(
                f"the {split} split of the {self.subset} subset is empty: no images under "
                f"{folder}/<class>/images. Check data.root, or evaluate another split."
            )
        return cap_per_class(samples, self.limits[split], self.seed, f"{self.subset}/{split}")

    def prepare_data(self) -> None:
        # Once per node, before any training step: a bad tree fails here, with every file named.
        self.index = self.scan()
        self._open_cache()  # packed here once per node; setup maps it in each other process
        if self.num_folds is not None:  # hashed here once per node; setup reads the cache
            self.folds(self.index)

    def folds(self, index: Index) -> dict[str, list[Sample]]:
        """``{"train": ..., "val": ...}`` of fold ``fold`` of ``num_folds`` over the pooled
        Train + Val of ``index`` (hashing them once into the cache folder)."""
        if self._fold_samples is None:
            from covidqu.data.duplicates import subset_hashes
            from covidqu.data.folds import fold_split

            pool = index.select(subset=self.subset, split="train")
            pool += index.select(subset=self.subset, split="val")
            hashes = subset_hashes(
                index,
                self.subset,
                pool,
                cache_root(self.cache_dir),
                progress=progress_bar("hashing for folds"),
            )
            self._fold_samples = fold_split(
                pool, hashes, self.num_folds, self.fold, self.fold_seed, self.duplicate_distance
            )
        return self._fold_samples

    def setup(self, stage: str | None = None) -> None:
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", SPLITS)
        if self.workers_setting == "auto" and self.trainer is not None:
            self.num_workers = loader_workers("auto", self.trainer.num_devices)
        self._open_cache()
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)

    def make_dataset(self, split: str) -> CXRDataset:
        """The dataset of one split, with training augmentation on ``train`` only."""
        augment = self.augment if split == "train" else None
        return CXRDataset(
            self.split_samples(split),
            target=self.target,
            transform=self._transform(augment),
            reader=self.reader,
            mean=self.mean,
            std=self.std,
            mark_bad_files=True,
            as_uint8=self.normalise == "device",
        )

    # -- loaders -------------------------------------------------------------------------------

    def dataloader(self, split: str, train: bool = False) -> BadFileLoader:
        """The loader of any split (:func:`~covidqu.data.loading.build_loader`); ``train``: a
        :class:`~covidqu.data.loading.TrainLoader` placed where a resumed run left its epoch."""
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        loader = build_loader(
            self.datasets[split],
            split,
            train=train,
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            bad_files=self.bad_files,
            seed=self.seed,
            balanced=self.balanced_sampler,
            drop_last=self.drop_last,
        )
        if isinstance(loader, ResumableLoader):
            if self._train_position is not None:
                loader.load_state_dict(self._train_position)
                self._train_position = None
            self._train_loader = loader
        return loader

    # -- resuming ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the training loader is in its epoch (saved in every checkpoint).

        Lightning also saves it as the fit loop's loader state, but restores that only into a
        loader built after the loops are restored; a module whose ``configure_optimizers`` asks
        for ``trainer.estimated_stepping_batches`` has the loader built before. The datamodule's
        own state is restored first of all, and handed to the loader when it is built.
        """
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_loader")
        self._train_position = dict(position) if position else None

    def skipped_files(self) -> dict[str, str]:
        """The files left out so far (``on_bad_file=skip``), path -> what was wrong, over all
        processes of a distributed run (every process must call it)."""
        return self.bad_files.skipped()

    def train_dataloader(self) -> BadFileLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> BadFileLoader:
        return self.dataloader("val", train=False)

    def test_dataloader(self) -> BadFileLoader:
        return self.dataloader("test", train=False)

    def predict_dataloader(self) -> BadFileLoader:
        return self.dataloader("test", train=False)

    # -- packed cache --------------------------------------------------------------------------

    def _open_cache(self) -> None:
        """Settle :attr:`cache` (``none`` or ``packed``, building the cache if it is chosen
        and absent) and :attr:`normalise` from their settings, and map the cache if chosen;
        once per process."""
        from covidqu.data.packed import PackedReader, ensure_packed

        if self._cache_chosen:
            return
        if self.index is None:
            self.index = self.scan()
        png = isinstance(self.reader, PngReader)
        on_gpu = png and trains_on_cuda(getattr(self, "trainer", None))
        args = (self.index, self.subset, self.image_size, cache_root(self.cache_dir))
        pack = partial(ensure_packed, *args, progress=progress_bar("packing"))
        folder = choose_cache(self.cache_setting, on_gpu, any(self.limits.values()), pack)
        self.cache = "none" if folder is None else "packed"
        if folder is not None:
            self.reader = PackedReader(folder)
        if self.normalise_setting == "auto":
            self.normalise = "device" if self.cache == "packed" else "loader"
        self._cache_chosen = True

    def _transform(self, augment: Sequence[A.BasicTransform] | None) -> A.Compose | None:
        """Resize and ``augment``; without the resize when the reader gives that size already."""
        if _size(self.image_size) != getattr(self.reader, "size", None):
            return build_transform(self.image_size, augment)
        return build_transform(self.image_size, augment, resize=False) if augment else None

    # -- batched augmentation on the device ---------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalise=device``, the uint8 batch made float; then ``device_augment`` on a
        training batch, once it is on the device.

        Its random parameters follow from the seed, the epoch, the batch's index in it and the
        process's rank: a run resumed mid-epoch (Lightning restores the fit loop's counters)
        augments its batches as the uninterrupted run did, and DDP processes differ.
        """
        if batch is None:
            return batch
        if self.normalise == "device":  # every stage: uint8 batches become the contract's here
            batch = finish_batch(batch, self.mean, self.std)
        trainer = self.trainer
        if self.device_augment is None or trainer is None:
            return batch
        if not trainer.training:  # validation, test, predict and sanity checks stay as read
            return batch
        # The hook runs before the loop counts the batch as ready: ``ready`` is its index.
        index = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        key = (self.seed, trainer.current_epoch, index, trainer.global_rank)
        return self.device_augment(batch, key=key, mean=self.mean, std=self.std)


class LungDataModule(COVIDQUDataModule):
    """The lung subset: lung masks and class labels for 33,920 CXRs."""

    subset = "lung"


class InfectionDataModule(COVIDQUDataModule):
    """The infection subset: lung and infection masks and class labels for 5,826 CXRs.

    ``target``: ``infection`` (binary), ``infection_multiclass`` (background / lung /
    infection) or ``lung``. Batches also carry ``lung``, the lung mask, for infection targets.
    """

    subset = "infection"
