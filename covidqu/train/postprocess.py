"""The post-processing a training run leaves in its checkpoint: fixed by the config
(``postprocess=none|all``), or chosen on the validation split once training ends
(``postprocess=auto``, :func:`covidqu.models.postprocess.choose`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from covidqu.files import bytes_of, write_atomic
from covidqu.models.postprocess import Choice, PostProcess, choose, trials

log = logging.getLogger(__name__)

#: The run folder's record of the choice.
CHOICE_FILE = "postprocess.json"


def config_of(cfg: DictConfig) -> dict[str, Any]:
    node = cfg.get("postprocess")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def recorded_steps(cfg: DictConfig) -> dict[str, Any]:
    """The steps a checkpoint records as it is saved: the fixed ones; none while ``auto`` has
    yet to choose (:func:`settle_choice` writes the choice into the best checkpoint)."""
    node = config_of(cfg)
    if node.get("mode", "fixed") != "fixed":
        return PostProcess().as_dict()
    return PostProcess.from_config(node).as_dict()


def prepare_choice(cfg: DictConfig, module: Any) -> None:
    """Before the best checkpoint is validated: with ``postprocess=auto``, have the
    segmentation ``module`` score every combination of the steps on each validation image."""
    if not hasattr(module, "trials"):  # classification: no masks
        return
    node = config_of(cfg)
    if node.get("mode") == "auto":
        module.trials = trials(module.class_names, PostProcess.from_config(node))


def settle_choice(
    cfg: DictConfig, module: Any, best: str | None, out_dir: Path, rank_zero: bool
) -> dict:
    """After the validation of the best checkpoint: choose (``auto``), record the choice in
    ``postprocess.json`` and in ``best``, and set it on ``module`` for the test. The figures
    for ``metrics.json``: ``val/dice_image_post`` and the steps kept."""
    if not getattr(module, "trials", None):
        steps = getattr(module, "postprocess", None)
        return {} if steps is None else {"postprocess": steps.describe()}
    choice = choose(module.class_names, PostProcess.from_config(config_of(cfg)), module.trial_rows)
    module.trials, module.trial_rows = None, []
    module.postprocess = choice.chosen
    module.recipe["postprocess"] = choice.chosen.as_dict()
    if rank_zero:
        write_atomic(out_dir / CHOICE_FILE, json.dumps(choice.as_dict(), indent=2) + "\n")
        if best:
            record_in_checkpoint(Path(best), choice)
    log.info(
        "post-processing chosen on the validation split (%d images): %s; mean per-image Dice "
        "%.4f without, %.4f with",
        choice.images,
        choice.chosen.describe(),
        choice.raw,
        choice.post,
    )
    return {
        "postprocess": choice.chosen.describe(),
        "val/dice_image_raw": choice.raw,
        "val/dice_image_post": choice.post,
    }


def record_in_checkpoint(path: Path, choice: Choice) -> None:
    """Write the chosen steps into the checkpoint's recipe (atomically, the rest unchanged)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.setdefault("covidqu", {})["postprocess"] = choice.chosen.as_dict()
    write_atomic(path, bytes_of(lambda buffer: torch.save(checkpoint, buffer)))
