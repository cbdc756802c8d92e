"""What ``predict`` checks before it loads a model: its values, the checkpoint(s) and inputs it
names, that ``explain=gradcam`` can apply to them, and that the output folder can be written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from covidqu.runtime.checks import (
    check_checkpoints,
    check_output_dir,
    check_values,
    refuse_empty_lists,
    require,
)

USAGE = (
    "python -m covidqu.predict ckpt_path=RUN/checkpoints/best.ckpt input=IMAGE_OR_FOLDER "
    "output=OUT_FOLDER"
)


def check_required(cfg: Mapping[str, Any]) -> None:
    """Refuse a config without ``ckpt_path``, ``input`` or ``output``."""
    require(cfg, ("ckpt_path", "input", "output"), USAGE)


def check_explain_of(cfg: DictConfig, recipe: dict[str, Any]) -> None:
    """Refuse ``explain=gradcam`` for a checkpoint whose task has no class head (or an
    ensemble), from its recipe, before anything is loaded."""
    from covidqu.models.checkpoint import module_class
    from covidqu.models.explain import check_explain

    task = (recipe.get("task") or {}).get("name")
    check_explain(cfg.get("explain", "none"), cfg.ckpt_path, module_class(recipe), task)


def check(cfg: DictConfig, out_dir: Path, overrides: Iterable[str] = ()) -> None:
    """``predict``'s checks (see the module docstring)."""
    from covidqu.runtime.inputs import find_inputs

    check_values(cfg, "predict")
    refuse_empty_lists(cfg, "ckpt_path")
    check_required(cfg)
    recipe = check_checkpoints(cfg.ckpt_path, "ckpt_path")
    check_explain_of(cfg, recipe)
    find_inputs(cfg.input, recursive=bool(cfg.get("recursive")))  # exists, holds images
    check_output_dir(cfg.output, "output")
