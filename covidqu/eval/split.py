"""What an evaluation reads: the DataModule a checkpoint was trained with, on the data asked
for, and any of its splits served as Lightning's test split.

A checkpoint trained on a fold of Train + Val (``data.num_folds``) is evaluated on its own
folds: ``split=val`` is the fold it validated on, ``split=train`` the others, and
``calibrate=true`` fits its temperature on that fold (the official Val is, in part, what it
trained on). An ensemble whose members validated on different folds has no such split: every
image of Train + Val was trained on by one of them, so only ``split=test`` scores it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class

from covidqu.errors import ConfigError

#: What a checkpoint's recipe says of the folds it was trained and validated on (``None``
#: throughout for the official Train / Val; a checkpoint older than a key lacks it).
FOLD_KEYS = ("num_folds", "fold", "fold_seed", "duplicate_distance")


def fold_settings(
    pres: Sequence[Mapping[str, Any]], split: str, key: str = "ckpt_path"
) -> dict[str, Any]:
    """The DataModule's fold arguments for checkpoints of preprocessing ``pres`` (one, or an
    ensemble's members), evaluated on ``split``: their folds where they share them; for an
    ensemble whose members differ, none (only ``test`` is then held out from all of them, and
    ``train`` or ``val`` is refused, naming the folds)."""
    settings = [  # the official splits (no num_folds) whatever else the recipe records
        {k: pre[k] for k in FOLD_KEYS if pre.get(k) is not None} if pre.get("num_folds") else {}
        for pre in pres
    ]
    if all(s == settings[0] for s in settings):
        return dict(settings[0])
    if split in ("train", "val"):
        folds = ", ".join(
            f"fold {s.get('fold')} of {s.get('num_folds')}"
            if s.get("num_folds")
            else "the official Val"
            for s in settings
        )
        raise ConfigError(
            f"split={split}: the members of {key} were validated on different splits of Train + "
            f"Val ({folds}), so every image of it was trained on by one of them: evaluate "
            f"split=test, or each member on its own ({key}=A.ckpt split={split})"
        )
    return {}


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
    folds: Mapping[str, Any] | None = None,
) -> pl.LightningDataModule:
    """The DataModule a checkpoint was trained with, on ``root`` (else its training root).

    Size, normalisation and target come from the checkpoint, and its folds (``folds``: from
    :func:`fold_settings`; ``None`` takes them from ``recipe_pre``); only where the data is and
    how it is loaded come from the caller.
    """
    if folds is None:
        folds = fold_settings([recipe_pre], "test")
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
        **folds,
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
