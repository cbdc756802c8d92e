"""What ``export`` checks before it loads a model: the keys it needs, that the format is known
and its libraries installed, that the checkpoint's network has one output, and that the output
file can be written."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from covidqu.errors import ConfigError, UserError
from covidqu.export.formats import EXPORTERS
from covidqu.runtime.checks import check_checkpoint, check_output_dir, require

#: How to install what ``format=onnx`` needs.
INSTALL_EXPORT = "pip install -e '.[export]'"
USAGE = (
    "python -m covidqu.export ckpt_path=RUN/checkpoints/best.ckpt format=onnx|torchscript "
    "output=FILE"
)


def check_required(cfg: Any) -> None:
    """Refuse a config without ``ckpt_path`` or ``output``, with the command that gives them."""
    require(cfg, ("ckpt_path", "output"), USAGE)


def check_format(fmt: Any) -> str:
    """``fmt`` if it is one of :data:`EXPORTERS`; else a :class:`ConfigError` listing them."""
    if fmt not in EXPORTERS:
        raise ConfigError(
            f"format={fmt} is not a known export format; choose "
            + " or ".join(f"format={name}" for name in EXPORTERS)
        )
    return fmt


def check_installed(fmt: str) -> None:
    """Refuse a format whose optional libraries are missing, saying how to install them."""
    if fmt != "onnx":
        return  # TorchScript is part of torch
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(m)]
    if missing:
        raise UserError(
            f"format=onnx needs {', '.join(missing)} (not installed here): run "
            f"{INSTALL_EXPORT} (or choose format=torchscript)"
        )


def check_output(output: Any) -> Path:
    """The file ``output`` names, refused (naming ``output``) where it cannot be written."""
    path = Path(str(output)).expanduser()
    if path.is_dir():
        raise ConfigError(f"output={path} is a folder; give a file, e.g. output={path}/model.onnx")
    check_output_dir(path.parent, "output")
    return path


def check_single_output(module: type[Any], recipe: dict[str, Any], ckpt_path: Any) -> None:
    """Refuse a network whose task cannot be exported as one output: ``module`` (the class of
    the checkpoint's module) says why (:attr:`~covidqu.models.task.TaskContract.export_refusal`)."""
    refusal = module.export_refusal
    if refusal is not None:
        task = (recipe.get("task") or {}).get("name")
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds a task={task} network ({refusal}), and export writes "
            "networks with one output only: export the checkpoint of a one-output task (e.g. "
            "task=infection or task=classify), or use python -m covidqu.predict with this one"
        )


def check(cfg: DictConfig, out_dir: Path, overrides: Iterable[str] = ()) -> None:
    """``export``'s checks (see the module docstring)."""
    check_required(cfg)
    check_installed(check_format(cfg.format))
    from covidqu.models.checkpoint import module_class

    recipe = check_checkpoint(cfg.ckpt_path, "ckpt_path")
    check_single_output(module_class(recipe), recipe, cfg.ckpt_path)
    check_output(cfg.output)
