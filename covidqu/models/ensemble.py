"""Ensembles: ``'ckpt_path=[A,B,C]'`` (and ``lung_ckpt`` / ``infection_ckpt`` of analyze).

An ensemble predicts the mean of its members' probabilities, each member's from its own
(calibrated, :mod:`covidqu.models.calibration`) logits; never the mean of logits, for the reason
:mod:`covidqu.models.tta` gives. It is presented to Lightning and to the commands as one module
of the members' own class (built from the first member's recipe, with its own metrics, rows and
overlays), whose network is an :class:`EnsembleNet` holding the members in an ``nn.ModuleList``:
the members move to the device and are replicated under DDP with it, and the test step, predict
and analyze run it unchanged. Its "logits" are those of the mean probabilities
(:meth:`~covidqu.models.base.CXRModule.logits_of`), the trick the test step uses for TTA.

Under test-time augmentation the ensemble averages its mean over the augmented views, which is
the mean over the members of each member's own TTA mean (both are plain means).

Members must agree on the task and the preprocessing (:data:`SHARED_FIELDS`): anything else is
refused before any image is read, naming both files and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig
from torch import Tensor, nn

from covidqu.errors import CheckpointError, ConfigError
from covidqu.models.base import CXRModule


def _get(recipe: dict[str, Any], *keys: str) -> Any:
    value: Any = recipe
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


#: What every member of an ensemble must share, by the name an error gives it: the task (name,
#: kind, module, segmentation mode, number of outputs, target, class names) and the
#: preprocessing (image size, normalisation, target, channels).
SHARED_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "task.name": lambda r: _get(r, "task", "name"),
    "task.kind": lambda r: _get(r, "task", "kind"),
    "module": lambda r: r.get("module_class"),
    "mode": lambda r: _get(r, "metrics", "mode"),
    "number of outputs": lambda r: _get(r, "metrics", "num_classes"),
    "class names": lambda r: r.get("classes"),
    "segmentation classes": lambda r: _get(r, "metrics", "class_names"),
    "data.target": lambda r: _get(r, "preprocess", "target"),
    "data.image_size": lambda r: _get(r, "preprocess", "image_size"),
    "data.mean": lambda r: _get(r, "preprocess", "mean"),
    "data.std": lambda r: _get(r, "preprocess", "std"),
    "input channels": lambda r: _get(r, "preprocess", "in_channels"),
}


def checkpoint_paths(value: Any, key: str = "ckpt_path") -> list[str]:
    """The checkpoints a config value names: one path, or a non-empty list of them."""
    if isinstance(value, ListConfig | list | tuple):
        paths = [str(p) for p in value]
        if not paths:
            raise ConfigError(
                f"{key}=[] names no checkpoint: give one ({key}=RUN/checkpoints/best.ckpt) or "
                f"an ensemble of several ('{key}=[A.ckpt,B.ckpt]')"
            )
        if any(p in ("", "None") for p in paths):
            raise ConfigError(f"{key}={paths} holds an empty entry: list checkpoint files only")
        return paths
    return [str(value)]


def is_ensemble(value: Any) -> bool:
    """Whether a config value is a list of checkpoints (one or more), not a single path."""
    return isinstance(value, ListConfig | list | tuple)


def check_members(recipes: Sequence[dict[str, Any]], paths: Sequence[Any], key: str) -> None:
    """Refuse members that differ from the first in a :data:`SHARED_FIELDS` field, naming
    both files, the field and both values."""
    first = recipes[0]
    for path, recipe in zip(paths[1:], recipes[1:], strict=True):
        for field, read in SHARED_FIELDS.items():
            a, b = read(first), read(recipe)
            if a != b:
                raise CheckpointError(
                    f"{key}: {paths[0]} and {path} cannot be ensembled: their {field} differs "
                    f"({a!r} and {b!r}). Members must share the task and the preprocessing: "
                    f"list only checkpoints trained with the same task, target, image size and "
                    f"normalisation, or retrain {path} with those of {paths[0]}"
                )


class EnsembleNet(nn.Module):
    """The members as one network: ``forward`` gives the logits of the mean of their
    probabilities, each member's of its calibrated logits."""

    def __init__(self, members: Sequence[CXRModule]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, ...]:
        first: CXRModule = self.members[0]  # type: ignore[assignment]
        probs = [m.probabilities(_as_float(m.calibrated(image))) for m in self.members]  # type: ignore[operator]
        if isinstance(probs[0], tuple):  # task=multitask: (pixel, class) probabilities
            return first.logits_of(
                tuple(torch.stack(p).mean(dim=0) for p in zip(*probs, strict=True))
            )
        return first.logits_of(torch.stack(probs).mean(dim=0))


def _as_float(logits: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """Logits in float32 (probabilities are averaged in full precision), each of a pair too."""
    if isinstance(logits, tuple):
        return tuple(part.float() for part in logits)
    return logits.float()


def ensemble_module(
    members: Sequence[CXRModule], paths: Sequence[Any], key: str = "ckpt_path"
) -> CXRModule:
    """One module of the members' class whose network is their :class:`EnsembleNet`; its
    recipe is the first member's, with ``ensemble`` listing the members' files."""
    from covidqu.models.checkpoint import build_from_recipe

    check_members([m.recipe for m in members], paths, key)
    recipe = {**members[0].recipe, "module_class": _class_name(members[0])}
    module = build_from_recipe(recipe, net=EnsembleNet(members))
    module.recipe["ensemble"] = [str(Path(p).expanduser().resolve()) for p in paths]
    return module.to(next(members[0].parameters()).device).eval()


def _class_name(module: CXRModule) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def load_model(
    value: Any, map_location: str | torch.device = "cpu", key: str = "ckpt_path"
) -> CXRModule:
    """The module a config value names: a checkpoint (``load_module``, as ever), or a list of
    them as one ensemble module (a list of one: that member alone). Members are checked
    against each other before any is loaded."""
    from covidqu.models.checkpoint import load_module, read_checkpoint

    paths = checkpoint_paths(value, key)
    if len(paths) == 1:
        return load_module(paths[0], map_location=map_location, key=key)
    recipes = [read_checkpoint(p, key)["covidqu"] for p in paths]
    check_members(recipes, paths, key)
    members = [load_module(p, map_location=map_location, key=key) for p in paths]
    return ensemble_module(members, paths, key)


def describe(value: Any) -> dict[str, Any]:
    """What ``metrics.json`` says of the checkpoints: ``checkpoint`` (a path, or the list of an
    ensemble's) and, for a list, ``ensemble`` (how many members)."""
    paths = [str(Path(p).expanduser().resolve()) for p in checkpoint_paths(value)]
    if not is_ensemble(value):
        return {"checkpoint": paths[0]}
    return {"checkpoint": paths, "ensemble": len(paths)}


def temperatures(module: CXRModule) -> float | list[float]:
    """The temperature a module's logits are divided by; an ensemble's, each member's."""
    if isinstance(module.net, EnsembleNet):
        return [float(m.temperature) for m in module.net.members]  # type: ignore[attr-defined]
    return float(module.temperature)
