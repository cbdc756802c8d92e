"""Evaluating a checkpoint on a split: what ``python -m covidqu.eval`` runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from covidqu.errors import ConfigError
from covidqu.models import calibration
from covidqu.models.checkpoint import preprocessing, read_checkpoint
from covidqu.models.ensemble import (
    checkpoint_paths,
    describe,
    is_ensemble,
    load_model,
    temperatures,
)
from covidqu.models.tta import check_tta
from covidqu.pipeline import outputs
from covidqu.pipeline.distributed import evaluation_trainer, job_scope

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")
#: The reliability diagram eval draws where the task gives confidences (classification).
RELIABILITY_FILE = "reliability.png"


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
    if is_ensemble(cfg.get("ckpt_path")):
        checkpoint_paths(cfg.ckpt_path)  # an empty list: refused as such
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
    if cfg.get("calibrate"):
        check_calibrate(cfg.ckpt_path)
    module = load_model(cfg.ckpt_path)
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
    fitted: dict[str, Any] = {}
    if cfg.get("calibrate"):
        fitted = calibrate(module, datamodule, cfg.ckpt_path, _device(cfg.trainer))
        if split == "val":
            log.warning("calibrate=true split=val: the temperature was fitted on the split scored")
    module.tta = tta  # every figure, row and overlay of the test step is of the TTA mean
    datamodule.setup({"test": "test", "val": "validate", "train": "fit"}[split])
    module.keep_overlays = int(cfg.get("num_overlays", 0))

    trainer = evaluation_trainer(cfg.trainer)
    results = trainer.test(module, datamodule=SplitAsTest(datamodule, split), verbose=False)
    figures = outputs.clean_figures(results[0] if results else {})
    metrics: dict[str, Any] = {f"{split}/{k.split('/', 1)[1]}": v for k, v in figures.items()}
    metrics["monitor"] = module.recipe.get("task", {}).get("monitor")
    metrics.update(describe(cfg.ckpt_path))
    metrics["split"] = split
    metrics["tta"] = tta
    metrics["temperature"] = temperatures(module)
    metrics.update(fitted)
    metrics["images"] = len(module.test_records)
    metrics["world_size"] = int(trainer.world_size)
    metrics.update(outputs.skipped_files(datamodule, out_dir))  # data.on_bad_file=skip
    outputs.write_metrics(out_dir, metrics)
    outputs.write_test_outputs(module, out_dir)
    reliability = module.test_reliability()
    if reliability is not None and trainer.is_global_zero:
        calibration.plot_reliability(
            *reliability, out_dir / RELIABILITY_FILE, title=f"{split} split, tta={tta}"
        )
    if trainer.is_global_zero:
        log.info(
            "evaluated %d %s images (tta=%s); outputs in %s",
            len(module.test_records),
            split,
            tta,
            out_dir,
        )
    return metrics


def check_calibrate(ckpt_path: Any) -> None:
    """Refuse ``calibrate=true`` where it cannot work: on an ensemble (each member keeps its own
    temperature: calibrate them one by one) or on a model without class logits."""
    if is_ensemble(ckpt_path):
        raise ConfigError(
            f"calibrate=true fits the temperature of one checkpoint, and ckpt_path={ckpt_path} "
            "lists several: calibrate each member on its own (python -m covidqu.eval "
            "ckpt_path=A.ckpt calibrate=true, then B.ckpt ...); the ensemble then uses each "
            "member's temperature"
        )
    task = read_checkpoint(ckpt_path)["covidqu"].get("task") or {}
    if task.get("kind") != "classification":
        # a multitask model has class logits too, but its temperature would have to reach the
        # class half of a pair of outputs everywhere: not done yet, so said plainly
        has = (
            "its class head is not calibrated yet"
            if task.get("name") == "multitask"
            else ("it has no class logits")
        )
        raise ConfigError(
            f"calibrate=true fits a temperature to class logits of a task=classify model, and "
            f"ckpt_path={ckpt_path} is a task={task.get('name')} model ({has}): drop "
            "calibrate=true, or give a task=classify checkpoint"
        )


def _device(trainer_cfg: Any) -> str:
    """Where the temperature's logits are computed: the GPU where the trainer would use one."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@torch.no_grad()  # not inference_mode: the temperature's fit differentiates through these
def validation_logits(module: Any, datamodule: Any, device: str) -> tuple[Any, Any]:
    """The module's raw logits (no temperature, no TTA) and targets over the validation split.

    A plain loop, not ``trainer.validate``: every DDP process computes the whole split itself
    and so fits the same temperature, with nothing to gather, before the processes exist.
    """
    module.to(device)
    logits, targets = [], []
    for batch in datamodule.dataloader("val"):
        if batch is None:  # data.on_bad_file=skip: no readable image in it
            continue
        batch = datamodule.on_after_batch_transfer(
            pl.utilities.move_data_to_device(batch, device), 0
        )
        logits.append(module(batch["image"]).float().cpu())
        targets.append(batch[module.target_key].cpu())
    if not logits:
        raise ConfigError(
            "calibrate=true needs the validation split, and it holds no readable image: check "
            "data.root (python -m covidqu.data inspect ROOT)"
        )
    return torch.cat(logits), torch.cat(targets)


def calibrate(module: Any, datamodule: Any, ckpt_path: Any, device: str) -> dict[str, Any]:
    """Fit ``module``'s temperature on the validation split, keep it in the checkpoint's sidecar
    and set it on the module; return its figures for ``metrics.json``."""
    module.temperature = 1.0  # fit to the network's own logits, not to an older temperature
    logits, target = validation_logits(module, datamodule, device)
    temperature = calibration.fit_temperature(logits, target)
    figures = {
        "val/ece_before": calibration.ece(torch.softmax(logits, dim=1), target),
        "val/ece_after": calibration.ece(torch.softmax(logits / temperature, dim=1), target),
        "val/nll_before": calibration.nll(logits, target),
        "val/nll_after": calibration.nll(logits, target, temperature),
    }
    state_dict = read_checkpoint(ckpt_path)["state_dict"]
    record = {
        "temperature": temperature,
        "fitted_on": "val",
        "images": int(target.numel()),
        **{k.removeprefix("val/"): v for k, v in figures.items()},
        "checkpoint": str(Path(ckpt_path).expanduser().resolve()),
        "fingerprint": calibration.weights_fingerprint(state_dict),
    }
    path = calibration.write_sidecar(ckpt_path, record)
    module.temperature = temperature
    log.info(
        "temperature %.4g fitted on %d val images (ECE %.4f -> %.4f); kept in %s",
        temperature,
        record["images"],
        figures["val/ece_before"],
        figures["val/ece_after"],
        path,
    )
    return {**figures, "calibration": str(path)}
