"""Training from a composed config: what ``python -m covidqu.train`` runs.

:func:`train` builds the DataModule, network, loss, metrics and LightningModule from the config
(everything through ``hydra.utils.instantiate``), fits, validates and tests the best checkpoint,
and writes ``metrics.json`` into the run folder. It returns the monitored value, so Hydra's
sweepers can optimise it.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from covidqu.constants import CLASSES
from covidqu.pipeline import outputs
from covidqu.pipeline.config import (
    apply_synthetic_defaults,
    check_config,
    print_config,
)

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group dict that has a ``_target_`` (null entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def make_recipe(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the network and its preprocessing on its own."""
    module_kwargs = OmegaConf.to_container(cfg.module, resolve=True)
    module_kwargs = {k: v for k, v in module_kwargs.items() if k not in ("_target_", "metrics")}
    return {
        "net": OmegaConf.to_container(cfg.model, resolve=True),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "metrics": OmegaConf.to_container(cfg.module.metrics, resolve=True),
        "module_kwargs": module_kwargs,
        "task": {
            "name": cfg.task.name,
            "kind": cfg.task.kind,
            "monitor": cfg.task.monitor,
            "monitor_mode": cfg.task.monitor_mode,
        },
        "classes": list(CLASSES),
        "preprocess": {
            "datamodule": cfg.data._target_,
            "subset": datamodule.subset,
            "target": datamodule.target,
            "image_size": OmegaConf.to_container(cfg.data, resolve=True)["image_size"],
            "mean": datamodule.mean,
            "std": datamodule.std,
            "in_channels": 1,
            "data_root": str(cfg.data.root),
        },
    }


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The DataModule and LightningModule a config describes."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    metrics = instantiate(cfg.module.metrics)
    module = instantiate(
        cfg.module,
        net=net,
        loss=loss,
        metrics=metrics,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler.scheduler) if cfg.scheduler.scheduler else None,
        scheduler_interval=cfg.scheduler.interval,
        scheduler_monitor=cfg.scheduler.monitor,
        recipe=make_recipe(cfg, datamodule),
        _recursive_=False,
        _convert_="all",  # plain lists and dicts: checkpoints then load with weights_only
    )
    return datamodule, module


def _has_split(datamodule: Any, split: str) -> bool:
    try:
        datamodule.split_samples(split)
    except Exception:  # an empty or missing split: reported by the caller
        return False
    return True


def train(cfg: DictConfig) -> float | None:
    """Fit, then validate and test the best checkpoint; write ``metrics.json``.

    Returns the value of ``task.monitor`` for the best checkpoint (``None`` when it was not
    logged, e.g. in a ``fast_dev_run``).
    """
    apply_synthetic_defaults(cfg)
    check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, out_dir)
    except BaseException as err:
        outputs.write_failure(out_dir, err, traceback.format_exc())
        raise


def _train(cfg: DictConfig, out_dir: Path) -> float | None:
    print_config(cfg)
    outputs.save_config(cfg, out_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule, module = build(cfg)
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.interrupted:
        log.warning("training was interrupted; checkpoints so far are in %s", out_dir)
        return None

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if best is None and not trainer.fast_dev_run:
        log.warning("no best checkpoint was recorded; final figures use the last weights")
    figures: dict[str, Any] = {}
    figures.update(_first(trainer.validate(module, datamodule=datamodule, ckpt_path=best)))
    if cfg.get("test", True):
        if _has_split(datamodule, "test"):
            figures.update(_first(trainer.test(module, datamodule=datamodule, ckpt_path=best)))
            outputs.write_test_outputs(module, out_dir)
        else:
            log.warning("no test split under %s: test figures are skipped", cfg.data.root)

    monitor = cfg.task.monitor
    metrics = outputs.clean_figures(figures)
    metrics["monitor"] = monitor
    metrics["epochs"] = int(trainer.current_epoch)
    if best is not None:
        metrics["best_checkpoint"] = outputs.relative(best, out_dir)
    outputs.write_metrics(out_dir, metrics)
    value = metrics.get(monitor)
    log.info("%s = %s (metrics.json in %s)", monitor, value, out_dir)
    return value


def _first(results: list[dict[str, float]]) -> dict[str, float]:
    return dict(results[0]) if results else {}


def set_output_dir(cfg: DictConfig, path: str | Path) -> None:
    """Point ``paths.output_dir`` at ``path`` (for runs composed outside ``@hydra.main``)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(path)
