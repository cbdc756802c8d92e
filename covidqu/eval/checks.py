"""What ``eval`` checks before it loads a model: its values, the checkpoint(s) it names, that
``calibrate=true`` and ``explain=gradcam`` can apply to them, the output folder, and the split
in the data tree."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from covidqu.runtime.checks import (
    check_output_dir,
    check_values,
    checkpoint_recipes,
    refuse_empty_lists,
    require,
)
from covidqu.runtime.cli import user_errors

USAGE = "python -m covidqu.eval ckpt_path=RUN/checkpoints/best.ckpt"


def check(cfg: DictConfig, out_dir: Path, overrides: Iterable[str] = ()) -> None:
    """``eval``'s checks (see the module docstring)."""
    check_values(cfg, "eval")
    refuse_empty_lists(cfg, "ckpt_path")
    require(cfg, ["ckpt_path"], USAGE)
    recipes = checkpoint_recipes(cfg.ckpt_path, "ckpt_path")
    recipe = recipes[0]
    if cfg.get("calibrate"):
        from covidqu.eval.calibrate import check_calibrate

        check_calibrate(cfg.ckpt_path)
    from covidqu.models.checkpoint import module_class
    from covidqu.models.explain import check_explain

    task = (recipe.get("task") or {}).get("name")
    check_explain(cfg.get("explain", "none"), cfg.ckpt_path, module_class(recipe), task)
    check_output_dir(out_dir, "hydra.run.dir")
    from covidqu.eval.split import datamodule_for, fold_settings

    folds = fold_settings([r["preprocess"] for r in recipes], cfg.split)
    with user_errors():
        datamodule = datamodule_for(
            recipe["preprocess"],
            cfg.data.get("root"),
            cache_dir=cfg.data.get("cache_dir"),
            folds=folds,
        )
    # the tree, and the split in it (a fold's: its images hashed once, into the cache folder)
    datamodule.split_samples(cfg.split)
