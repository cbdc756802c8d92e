"""Rebuilding a trained module from its checkpoint alone.

Every checkpoint written by a covidqu run holds, under the ``covidqu`` key, the plain-dict
configs of the network, loss and metrics, the module's class and options, and the data
preprocessing (image size, normalisation, target). Evaluation and prediction use these, never
the user's current config, so a changed default cannot silently change how images are resized
or normalised.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate

from covidqu.errors import CheckpointError, MissingFileError
from covidqu.models.base import CXRModule

#: Keys of a network config that ask for pretrained weights; loading a checkpoint sets them to
#: ``None`` because the checkpoint's own weights replace them (and no download is attempted).
WEIGHT_KEYS = ("encoder_weights", "weights")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict; a clear error for a missing or foreign file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"ckpt_path={p} does not exist; pass a run's checkpoints/best.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which
        raise CheckpointError(f"ckpt_path={p} is not a readable checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "covidqu" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"ckpt_path={p} was not written by a covidqu run (no 'covidqu' recipe inside); "
            "pass a run's checkpoints/best.ckpt or last.ckpt"
        )
    return ckpt


def build_from_recipe(recipe: dict[str, Any]) -> CXRModule:
    """A module with freshly built network, loss and metrics as described by ``recipe``."""
    net_cfg = copy.deepcopy(recipe["net"])
    for key in WEIGHT_KEYS:
        if key in net_cfg:
            net_cfg[key] = None
    net = instantiate(net_cfg)
    loss = instantiate(recipe["loss"]) if recipe.get("loss") else None
    metrics = instantiate(recipe["metrics"])
    cls = get_class(recipe["module_class"])
    kwargs = dict(recipe.get("module_kwargs") or {})
    inner = {k: v for k, v in recipe.items() if k != "module_class"}
    return cls(net=net, loss=loss, metrics=metrics, recipe=inner, **kwargs)


def load_module(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> CXRModule:
    """The trained module of a checkpoint, in eval mode, with its recipe in ``module.recipe``."""
    ckpt = read_checkpoint(path)
    module = build_from_recipe(ckpt["covidqu"])
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    # Loss functions may carry buffers (class weights) that older recipes did not: tolerate
    # those, but never a network weight that does not fit.
    bad = [k for k in (*missing, *unexpected) if not k.startswith("loss_fn.")]
    if bad:
        raise CheckpointError(
            f"ckpt_path={path}: its weights do not fit the network its recipe builds "
            f"({len(bad)} keys, e.g. {bad[:3]})"
        )
    return module.to(map_location).eval()


def preprocessing(module: CXRModule) -> dict[str, Any]:
    """The data preprocessing a module was trained with (size, mean, std, target, subset)."""
    pre = module.recipe.get("preprocess")
    if not pre:
        raise CheckpointError("the checkpoint's recipe has no preprocessing section")
    return dict(pre)
