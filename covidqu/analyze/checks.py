"""What ``analyze`` checks before it loads a model: its values (the severity grades' cut-offs
rising within 0..100 among them), the checkpoints it names, that the infection model can give
the detection score asked for, the inputs, the output folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from covidqu.errors import ConfigError
from covidqu.runtime.checks import (
    check_checkpoints,
    check_output_dir,
    check_values,
    refuse_empty_lists,
    require,
    value_at,
)
from covidqu.scoring.severity import check_cutoffs

#: The checkpoints ``analyze`` takes.
CKPT_KEYS = ("lung_ckpt", "infection_ckpt")
USAGE = (
    "python -m covidqu.analyze lung_ckpt=LUNG.ckpt infection_ckpt=INF.ckpt input=FILE_OR_DIR "
    "(or data.root=ROOT split=test), or infection_ckpt alone for a model trained with "
    "data.target=infection_multiclass"
)
#: The values of ``detect.score``: what an image's COVID-19 score is made of.
DETECT_SCORES = ("mask", "classifier", "mean")


def check_detect_score(
    score: str, has_head: bool, infection_ckpt: Any, threshold: float | None = None
) -> str:
    """``score`` if it is one of :data:`DETECT_SCORES`, the infection model can give it, and a
    fixed ``detect.threshold`` is on its scale; a :class:`ConfigError` naming ``detect.score``
    (and ``infection_ckpt`` or ``detect.threshold``) otherwise."""
    if score not in DETECT_SCORES:
        raise ConfigError(
            f"detect.score={score} is not one of {', '.join(DETECT_SCORES)}: e.g. detect.score=mask"
        )
    if score != "mask" and not has_head:
        raise ConfigError(
            f"detect.score={score} needs an infection model with a classification head, but "
            f"infection_ckpt={infection_ckpt} has none: give a task=multitask checkpoint as "
            "infection_ckpt, or use detect.score=mask"
        )
    if score != "mask" and threshold is not None and threshold > 1:
        raise ConfigError(
            f"detect.threshold={threshold} is a percent of the lung, but detect.score={score} "
            "scores from 0 to 1: give detect.threshold in [0, 1] (e.g. 0.5), or leave it null "
            "to tune it on another split"
        )
    return score


def check(cfg: DictConfig, out_dir: Path, overrides: Iterable[str] = ()) -> None:
    """``analyze``'s checks (see the module docstring)."""
    from covidqu.models.checkpoint import module_class
    from covidqu.runtime.inputs import find_inputs

    check_values(cfg, "analyze")
    check_cutoffs(value_at(cfg, "grades"))  # each in 0..100 by RULES; here: rising, all there
    refuse_empty_lists(cfg, *CKPT_KEYS)
    require(cfg, ["infection_ckpt"], USAGE)
    recipes = {key: check_checkpoints(cfg[key], key) for key in CKPT_KEYS if cfg.get(key)}
    has_head = module_class(recipes["infection_ckpt"]).class_head
    threshold = cfg.detect.get("threshold")
    check_detect_score(cfg.detect.get("score", "mask"), has_head, cfg.infection_ckpt, threshold)
    if cfg.get("input"):
        find_inputs(cfg.input, recursive=bool(cfg.get("recursive")))  # exists, holds images
    if cfg.get("output"):
        check_output_dir(cfg.output, "output")
    else:
        check_output_dir(out_dir, "hydra.run.dir")
