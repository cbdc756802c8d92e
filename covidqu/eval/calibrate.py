"""``eval calibrate=true``: fit a temperature to a classifier's logits on the validation split,
and keep it beside the checkpoint (see :mod:`covidqu.models.calibration`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from covidqu.errors import ConfigError
from covidqu.models import calibration
from covidqu.models.checkpoint import module_class, read_checkpoint
from covidqu.models.ensemble import is_ensemble
from covidqu.scoring.calibration import ece

log = logging.getLogger(__name__)


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
    recipe = read_checkpoint(ckpt_path)["covidqu"]
    refusal = module_class(recipe).calibration_refusal
    if refusal is not None:
        task = (recipe.get("task") or {}).get("name")
        raise ConfigError(
            f"calibrate=true fits a temperature to a model's class logits, and "
            f"ckpt_path={ckpt_path} is a task={task} model ({refusal}): drop calibrate=true, or "
            "give the checkpoint of a classifier (task=classify)"
        )


def device_of(trainer_cfg: Any) -> str:
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
        "val/ece_before": ece(torch.softmax(logits, dim=1), target),
        "val/ece_after": ece(torch.softmax(logits / temperature, dim=1), target),
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
