"""The learning-rate finder of ``python -m covidqu.train tune=lr``: Lightning's own
(:meth:`pytorch_lightning.tuner.Tuner.lr_find`), run on the trainer, module and data the run
was built with, before it trains.

It trains ``tune.num_training`` optimizer steps from the network as built while the learning
rate rises from ``tune.min_lr`` to ``tune.max_lr``, then restores the network, optimizer and
loops as they were. Its suggestion is the rate where the smoothed loss fell fastest. The run
folder gets ``lr_find.png`` (Lightning's plot: loss against learning rate, the suggestion
marked) and ``lr_find.json`` (the suggestion, the settings and the curve). With
``tune.apply=false`` the run stops there; with ``tune.apply=true`` the module gets it as its
``lr`` (:attr:`covidqu.models.base.CXRModule.lr`, the optimizer's ``lr``) and the run trains
with it, recorded as ``optimizer.lr`` in ``config.yaml`` and as ``tuned_lr`` in
``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from covidqu.errors import ConfigError, UserError
from covidqu.files import write_atomic
from covidqu.runtime import outputs

log = logging.getLogger(__name__)

#: The files the finder leaves in the run folder.
PLOT_FILE = outputs.LR_FIND_PLOT
RECORD_FILE = outputs.LR_FIND_FILE


@dataclass(frozen=True)
class Found:
    """The learning rate the finder suggested, and whether the run stops with it
    (``tune.apply=false``) or trains with it."""

    lr: float
    stop: bool


def wanted(cfg: DictConfig) -> bool:
    """Whether the config asks for the learning-rate finder (``tune=lr``)."""
    tune = cfg.get("tune")
    return tune is not None and tune.get("name", "none") == "lr"


def find_lr(
    cfg: DictConfig, trainer: Any, module: Any, datamodule: Any, out_dir: Path, resume: str | None
) -> Found | None:
    """Run the finder where ``tune=lr`` (``None`` otherwise); see the module docstring.

    A run resumed from a checkpoint (``resume``) with ``tune.apply=true`` trains on with the
    learning rate its first attempt found (its ``lr_find.json``): the finder does not run
    again, nor change a rate that the checkpoint's optimizer state carries anyway.
    """
    if not wanted(cfg):
        return None
    tune = cfg.tune
    if trainer.world_size > 1:  # e.g. trainer.devices=auto on a machine of several GPUs
        raise ConfigError(
            f"tune=lr runs on one device, but this run has {trainer.world_size} processes "
            f"(trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes})"
            ": Lightning's learning-rate finder does not support distributed training. Find "
            "the rate with trainer.devices=1 first, then train on several devices with "
            "optimizer.lr=<the suggestion> (and without tune=lr)"
        )
    if resume and tune.apply:
        return _found_before(cfg, module, out_dir)
    from pytorch_lightning.tuner import Tuner

    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    # Lightning's finder counts optimizer steps but would still stop at trainer.max_epochs:
    # a small train split (or a short run) must not cut the curve short. An epoch has a step
    # at least, so num_training epochs are enough (-1, no limit, stays).
    if max_epochs != -1:
        loop.max_epochs = max(max_epochs, int(tune.num_training))
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=datamodule,
            min_lr=float(tune.min_lr),
            max_lr=float(tune.max_lr),
            num_training=int(tune.num_training),
            mode=str(tune.mode),
            early_stop_threshold=tune.early_stop_threshold,
            update_attr=False,  # _use sets the rate, here and for a resumed run alike
        )
    finally:
        loop.max_epochs = max_epochs
    if finder is None:  # Lightning skips it under fast_dev_run (refused up front too)
        raise ConfigError("tune=lr does not run with trainer.fast_dev_run: drop one of them")
    lr = finder.suggestion()
    steps = len(finder.results.get("lr", []))
    if lr is None:
        raise UserError(
            f"the learning-rate finder could not suggest a rate: {steps} of "
            f"tune.num_training={tune.num_training} steps ran (it stops early once the loss "
            "diverges, and the suggestion skips the first 10 steps and the last). Raise "
            "tune.num_training, lower tune.max_lr, or set tune.early_stop_threshold=null"
        )
    lr = float(lr)
    _write(out_dir, finder, lr, tune)
    log.info(
        "learning-rate finder: %s steps from %g to %g suggest optimizer.lr=%.3g (%s, %s in %s)",
        steps,
        tune.min_lr,
        tune.max_lr,
        lr,
        PLOT_FILE,
        RECORD_FILE,
        out_dir,
    )
    if not tune.apply:
        log.info(
            "tune.apply=false: stopping here; train with it: optimizer.lr=%.3g (or tune=lr "
            "tune.apply=true)",
            lr,
        )
        return Found(lr, stop=True)
    return _use(cfg, module, lr, out_dir)


def _use(cfg: DictConfig, module: Any, lr: float, out_dir: Path) -> Found:
    """Train with ``lr``: the module's optimizer, and ``optimizer.lr`` in the run's config."""
    module.lr = lr
    cfg.optimizer.lr = lr
    outputs.save_config(cfg, out_dir)  # config.yaml says what the run trains with
    log.info("tune.apply=true: training with optimizer.lr=%.3g", lr)
    return Found(lr, stop=False)


def _found_before(cfg: DictConfig, module: Any, out_dir: Path) -> Found | None:
    path = out_dir / RECORD_FILE
    try:
        lr = outputs.lr_suggestion(out_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning(
            "tune=lr: this run resumes from a checkpoint, whose optimizer state holds the rate "
            "it trained with; the finder does not run again (%s has no suggestion: %s)",
            path,
            err,
        )
        return None
    log.info("tune=lr: resuming with the rate the first attempt found (%s)", path)
    return _use(cfg, module, lr, out_dir)


def _finite(values: list[Any]) -> list[float | None]:
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]


@rank_zero_only
def _write(out_dir: Path, finder: Any, lr: float, tune: DictConfig) -> None:
    """``lr_find.json`` and ``lr_find.png`` in the run folder, each whole or not at all."""
    from covidqu.scoring.plots import figure, save

    record = {
        "suggestion": lr,
        "min_lr": float(tune.min_lr),
        "max_lr": float(tune.max_lr),
        "num_training": int(tune.num_training),
        "mode": str(tune.mode),
        "early_stop_threshold": tune.early_stop_threshold,
        "steps": len(finder.results["lr"]),
        "lr": _finite(finder.results["lr"]),
        "loss": _finite(finder.results["loss"]),  # smoothed, as Lightning's suggestion reads it
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    fig = figure(6.0, 4.0)
    ax = fig.add_subplot()
    finder.plot(suggest=True, ax=ax)  # Lightning's plot, on a figure without pyplot
    ax.set_title(f"learning-rate finder: suggestion {lr:.3g}")
    save(fig, out_dir / PLOT_FILE)
