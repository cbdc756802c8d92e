"""What an evaluation reads: the DataModule a checkpoint was trained with, on the data asked
for, and any of its splits served as Lightning's test split."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class


def datamodule_for(
    recipe_pre: dict[str, Any],
    root: str | os.PathLike[str] | None,
    batch_size: int = 32,
    num_workers: int | str = "auto",
    limit_per_class: Any = None,
    on_bad_file: str = "error",
    cache: str = "none",
    cache_dir: str | None = None,
    normalise: str = "auto",
) -> pl.LightningDataModule:
    """The DataModule a checkpoint was trained with, on ``root`` (else its training root).

    Size, normalisation and target come from the checkpoint; only where the data is and how
    it is loaded come from the caller.
    """
    root = root or os.environ.get("COVIDQU_ROOT") or recipe_pre.get("data_root")
    cls = get_class(recipe_pre["datamodule"])
    return cls(
        root=root,
        target=recipe_pre["target"],
        image_size=recipe_pre["image_size"],
        mean=recipe_pre["mean"],
        std=recipe_pre["std"],
        batch_size=batch_size,
        num_workers=num_workers,
        limit_per_class=limit_per_class,
        augment=None,
        on_bad_file=on_bad_file,
        cache=cache,
        cache_dir=cache_dir,
        normalise=normalise,
    )


class SplitAsTest(pl.LightningDataModule):
    """Serve any split of a DataModule as the test split of ``trainer.test``.

    The loader is built when the Trainer asks for it, once the DDP processes exist, so the
    DataModule shards it without repeats (:func:`covidqu.data.loading.eval_sampler`); a
    loader built beforehand would get Lightning's padding DistributedSampler instead.
    """

    def __init__(self, datamodule: Any, split: str) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.split = split

    def test_dataloader(self) -> Any:
        return self.datamodule.dataloader(self.split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this wrapper's hook, not the DataModule's: data.normalise=device
        # batches are made float there.
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
