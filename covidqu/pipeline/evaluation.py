"""Evaluating a checkpoint on a split: what ``python -m covidqu.eval`` runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig

from covidqu.models.checkpoint import load_module, preprocessing
from covidqu.models.tta import check_tta
from covidqu.pipeline import outputs
from covidqu.pipeline.distributed import evaluation_trainer, job_scope

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")


def datamodule_for(
    recipe_pre: dict[str, Any],
    root: str | os.PathLike[str] | None,
    batch_size: int = 32,
    num_workers: int = 4,
    limit_per_class: Any = None,
    on_bad_file: str = "error",
    cache: str = "none",
    cache_dir: str | None = None,
    normalise: str = "loader",
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
    DataModule shards it without repeats (:func:`covidqu.data.datamodule._eval_sampler`); a
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on ``cfg.split``; write metrics.json, per_image.csv, overlays.

    On several processes (``trainer=ddp_cpu``) each evaluates its shard of the split; the
    figures and rows are those of one process, written once, by the first.
    """
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path is required: python -m covidqu.eval ckpt_path=RUN/checkpoints/best.ckpt"
        )
    split = cfg.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"split={split} is not one of {SPLITS}")
    check_tta(cfg.get("tta", "none"))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_scope():
        return _evaluate(cfg, split, out_dir)


def _evaluate(cfg: DictConfig, split: str, out_dir: Path) -> dict[str, Any]:
    tta = cfg.get("tta", "none")
    module = load_module(cfg.ckpt_path)
    module.tta = tta  # every figure, row and overlay of the test step is of the TTA mean
    pre = preprocessing(module)
    datamodule = datamodule_for(
        pre,
        cfg.data.get("root"),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        limit_per_class=cfg.data.get("limit_per_class"),
        on_bad_file=cfg.data.get("on_bad_file", "error"),
        cache=cfg.data.get("cache", "none"),
        cache_dir=cfg.data.get("cache_dir"),
        normalise=cfg.data.get("normalise", "loader"),
    )
    datamodule.setup({"test": "test", "val": "validate", "train": "fit"}[split])
    module.keep_overlays = int(cfg.get("num_overlays", 0))

    trainer = evaluation_trainer(cfg.trainer)
    results = trainer.test(module, datamodule=SplitAsTest(datamodule, split), verbose=False)
    figures = outputs.clean_figures(results[0] if results else {})
    metrics: dict[str, Any] = {f"{split}/{k.split('/', 1)[1]}": v for k, v in figures.items()}
    metrics["monitor"] = module.recipe.get("task", {}).get("monitor")
    metrics["checkpoint"] = str(Path(cfg.ckpt_path).expanduser().resolve())
    metrics["split"] = split
    metrics["tta"] = tta
    metrics["images"] = len(module.test_records)
    metrics["world_size"] = int(trainer.world_size)
    metrics.update(outputs.skipped_files(datamodule, out_dir))  # data.on_bad_file=skip
    outputs.write_metrics(out_dir, metrics)
    outputs.write_test_outputs(module, out_dir)
    if trainer.is_global_zero:
        log.info(
            "evaluated %d %s images (tta=%s); outputs in %s",
            len(module.test_records),
            split,
            tta,
            out_dir,
        )
    return metrics
