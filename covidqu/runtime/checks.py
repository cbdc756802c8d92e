"""Cheap checks first: what a command verifies before it builds a network or writes a file.

Every command (``train``, ``eval``, ``predict``, ``analyze``, ``export``) runs :func:`preflight`
from a Hydra callback (:class:`Preflight`, on ``on_run_start``), that is before Hydra creates the
run folder or writes its ``.hydra/`` files, so a refused command leaves a previous run's folder
exactly as it was. :func:`preflight` calls the command's own ``covidqu.<command>.checks.check``,
which uses the checks every command shares, here:

- the type and range of every config value of :data:`RULES` (all wrong values at once);
- that the output folder can be written;
- that the files and checkpoints a config key names exist and are covidqu checkpoints.

``train`` runs its checks again itself (sweep jobs and in-process callers have no
``on_run_start``).
"""

from __future__ import annotations

import importlib
import numbers
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from covidqu.errors import ConfigError, MissingFileError, UserError
from covidqu.models.tta import TTA_MODES
from covidqu.runtime.cli import report

#: What :func:`value_at` gives for a key the config lacks.
MISSING = object()


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda x: _int(x) and x >= low


def _null_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


def _bool(x: Any) -> bool:
    return isinstance(x, bool)


def _positive(x: Any) -> bool:
    return _number(x) and x > 0


def _non_negative(x: Any) -> bool:
    return _number(x) and x >= 0


def _image_size(x: Any) -> bool:
    if _int(x):
        return x >= 32
    return isinstance(x, list | tuple) and len(x) == 2 and all(_int(v) and v >= 32 for v in x)


def _devices(x: Any) -> bool:
    if x == "auto" or (_int(x) and (x >= 1 or x == -1)):
        return True
    if isinstance(x, str):  # "0,1" or "1," as Lightning reads them
        return bool(x.strip(", ")) and all(p.strip().isdigit() for p in x.strip(", ").split(","))
    return isinstance(x, list | tuple) and bool(x) and all(_int(v) and v >= 0 for v in x)


def _limit_batches(x: Any) -> bool:
    return x is None or (_int(x) and x >= 0) or (_number(x) and 0.0 <= x <= 1.0)


def _limit_per_class(x: Any) -> bool:
    if isinstance(x, Mapping):
        return all(_null_or(_int_at_least(1))(v) for v in x.values())
    return _null_or(_int_at_least(1))(x)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda x: x in choices


def _precisions() -> tuple[str, ...]:
    """Every ``trainer.precision`` Lightning takes, as text (its own lists of them)."""
    from typing import get_args

    from lightning_fabric.connector import _PRECISION_INPUT

    return tuple(str(v) for kind in get_args(_PRECISION_INPUT) for v in get_args(kind))


def _precision(x: Any) -> bool:
    return str(x) in _precisions()


def _accelerator(x: Any) -> bool:
    from pytorch_lightning.accelerators import AcceleratorRegistry

    return x in ("auto", "gpu") or x in AcceleratorRegistry.available_accelerators()


@dataclass(frozen=True)
class Rule:
    """A config key, what its value must be, and an example of a good one."""

    key: str
    check: Callable[[Any], bool]
    want: str
    example: str
    #: The commands (config names) it applies to; ``None``: every command that has the key.
    commands: tuple[str, ...] | None = None


#: What every checked config value must be. A key a command's config lacks is not checked.
RULES: tuple[Rule, ...] = (
    Rule("seed", _null_or(_int), "an integer or null", "seed=42"),
    Rule("optimizer.lr", _positive, "a positive number", "optimizer.lr=1e-3"),
    Rule("optimizer.weight_decay", _non_negative, "a number >= 0", "optimizer.weight_decay=1e-4"),
    Rule("optimizer.momentum", _non_negative, "a number >= 0", "optimizer.momentum=0.9"),
    Rule("data.batch_size", _int_at_least(1), "an integer >= 1", "data.batch_size=16"),
    Rule("data.eval_batch_size", _null_or(_int_at_least(1)), "null or an integer >= 1", "null"),
    Rule(
        "data.num_workers",
        lambda x: x == "auto" or _int_at_least(0)(x),
        "auto or an integer >= 0",
        "data.num_workers=4",
    ),
    Rule(
        "data.image_size",
        _image_size,
        "a side of at least 32 px, or [height, width]",
        "data.image_size=256",
    ),
    Rule("data.mean", _number, "a number", "data.mean=0.449"),
    Rule("data.std", _positive, "a positive number", "data.std=0.226"),
    Rule(
        "data.limit_per_class",
        _limit_per_class,
        "null, an integer >= 1, or {train: N, val: N, test: N}",
        "data.limit_per_class=100",
    ),
    Rule(
        "trainer.devices",
        _devices,
        "a number of devices >= 1, -1 (all), auto, or a list of device ids",
        "trainer.devices=2",
    ),
    Rule("trainer.num_nodes", _int_at_least(1), "an integer >= 1", "trainer.num_nodes=1"),
    Rule(
        "trainer.max_epochs",
        lambda x: _int(x) and (x >= 1 or x == -1),
        "an integer >= 1 (or -1: no limit)",
        "trainer.max_epochs=50",
    ),
    Rule("trainer.min_epochs", _null_or(_int_at_least(0)), "null or an integer >= 0", "1"),
    Rule("trainer.precision", _precision, "a Lightning precision", "trainer.precision=bf16-mixed"),
    Rule("trainer.accelerator", _accelerator, "auto, cpu, gpu, ...", "trainer.accelerator=cpu"),
    Rule("trainer.accumulate_grad_batches", _int_at_least(1), "an integer >= 1", "1"),
    Rule("trainer.gradient_clip_val", _null_or(_non_negative), "null or a number >= 0", "1.0"),
    Rule("trainer.check_val_every_n_epoch", _null_or(_int_at_least(1)), "an integer >= 1", "1"),
    Rule("trainer.log_every_n_steps", _int_at_least(1), "an integer >= 1", "10"),
    *(
        Rule(
            f"trainer.limit_{s}_batches",
            _limit_batches,
            "null, a number of batches, or a fraction in [0, 1]",
            f"trainer.limit_{s}_batches=0.25",
        )
        for s in ("train", "val", "test")
    ),
    Rule("ema", _bool, "true or false", "ema=true", ("train",)),
    Rule("print_config", _bool, "true or false", "print_config=true", ("train",)),
    Rule(
        "ema_decay",
        lambda x: _number(x) and 0 < x < 1,
        "a number between 0 and 1 (exclusive)",
        "ema_decay=0.999",
        ("train",),
    ),
    Rule("encoder.load_decoder", _bool, "true or false", "encoder.load_decoder=true", ("train",)),
    Rule(
        "module.channels_last",
        _null_or(_bool),
        "null (on where the module runs on a CUDA device), true or false",
        "module.channels_last=null",
        ("train",),
    ),
    Rule("module.compile", _bool, "true or false", "module.compile=true", ("train",)),
    Rule(
        "tune.num_training",
        _int_at_least(13),
        "an integer >= 13 (the suggestion skips the first 10 steps and the last)",
        "tune.num_training=100",
        ("train",),
    ),
    *(
        Rule(f"tune.{k}", _positive, "a positive number", f"tune.{k}={v}", ("train",))
        for k, v in (("min_lr", "1e-7"), ("max_lr", "1.0"))
    ),
    Rule("tune.mode", _one_of("exponential", "linear"), "exponential or linear", "exponential"),
    Rule(
        "tune.early_stop_threshold",
        _null_or(lambda x: _number(x) and x > 1),
        "null (never stop early) or a number > 1",
        "tune.early_stop_threshold=4.0",
        ("train",),
    ),
    Rule("tune.apply", _bool, "true or false", "tune.apply=true"),
    Rule("callbacks.early_stopping.patience", _int_at_least(0), "an integer >= 0", "20"),
    Rule("batch_size", _int_at_least(1), "an integer >= 1", "batch_size=16"),
    Rule(
        "num_workers",
        lambda x: x == "auto" or _int_at_least(0)(x),
        "auto or an integer >= 0",
        "num_workers=auto",
    ),
    Rule("num_overlays", _int_at_least(0), "an integer >= 0", "num_overlays=16"),
    Rule("num_worst", _int_at_least(0), "an integer >= 0", "num_worst=12"),
    Rule("split", _one_of("test", "val", "train"), "test, val or train", "split=val", ("eval",)),
    Rule("split", _one_of("test", "val"), "test or val", "split=test", ("analyze",)),
    Rule(
        "detect.threshold",
        _null_or(lambda x: _number(x) and 0 <= x <= 100),
        "null or a percent of the lung in [0, 100]",
        "detect.threshold=1.5",
    ),
    Rule("tta", _one_of(*TTA_MODES), "none, flip or flip_scale", "tta=flip"),
    Rule(
        "explain",
        _one_of("none", "gradcam"),
        "none or gradcam (a Grad-CAM heatmap of the predicted class beside each image)",
        "explain=gradcam",
        ("eval", "predict"),
    ),
    Rule(
        "detect.score",
        _one_of("mask", "classifier", "mean"),
        "mask, classifier or mean",
        "detect.score=classifier",
        ("analyze",),
    ),
    *(
        Rule(
            f"module.loss_weights.{part}",
            _non_negative,
            "a number >= 0",
            f"module.loss_weights.{part}={weight}",
        )
        for part, weight in (("seg", 1.0), ("cls", 0.5))
    ),
    Rule("detect.n_boot", _int_at_least(0), "an integer >= 0", "detect.n_boot=1000"),
    Rule(
        "postprocess.mode",
        _one_of("auto", "fixed"),
        "auto or fixed",
        "postprocess=auto",
        ("train",),
    ),
    Rule(
        "postprocess.mode",
        _one_of("checkpoint", "fixed"),
        "the checkpoint's, none or all",
        "postprocess=checkpoint",
        ("eval", "predict", "analyze", "export"),
    ),
    Rule(
        "postprocess.lung_components",
        _int_at_least(0),
        "an integer >= 0 (0: off)",
        "postprocess.lung_components=2",
    ),
    *(
        Rule(f"postprocess.{k}", _bool, "true or false", f"postprocess.{k}=true")
        for k in ("fill_holes", "inside_lung")
    ),
    Rule(
        "postprocess.min_infection_area",
        lambda x: _number(x) and 0 <= x < 1,
        "a share of the image in [0, 1) (0: off)",
        "postprocess.min_infection_area=0.001",
    ),
    *(
        Rule(f"grades.{g}", lambda x: _number(x) and 0 <= x <= 100, "a percent in [0, 100]", "25")
        for g in ("mild", "moderate", "severe", "critical")
    ),
)


def value_at(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (containers as plain ones); :data:`MISSING` if absent."""
    try:
        value = OmegaConf.select(cfg, key, default=MISSING, throw_on_missing=False)
    except Exception:  # an interpolation that resolves only later (e.g. ${hydra:...})
        return MISSING
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_values(cfg: DictConfig, command: str, rules: Iterable[Rule] = RULES) -> None:
    """Raise one :class:`ConfigError` listing every value of ``cfg`` that breaks a rule."""
    wrong = []
    for rule in rules:
        if rule.commands is not None and command not in rule.commands:
            continue
        value = value_at(cfg, rule.key)
        if value is MISSING or rule.check(value):
            continue
        example = rule.example if "=" in rule.example else f"{rule.key}={rule.example}"
        wrong.append(f"{rule.key}={value!r}: must be {rule.want}, e.g. {example}")
    accelerator = value_at(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            wrong.append(
                f"trainer.accelerator={accelerator}: no GPU is visible here; use trainer=cpu "
                "(or trainer.accelerator=cpu), or run where a GPU is"
            )
    if len(wrong) == 1:
        raise ConfigError(wrong[0])
    if wrong:
        raise ConfigError(f"{len(wrong)} config values are wrong:\n  " + "\n  ".join(wrong))


def check_output_dir(path: str | os.PathLike[str], key: str) -> None:
    """Refuse an output folder that cannot be created or written, naming ``key``."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():  # the nearest existing ancestor decides
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"{probe} is a file, not a folder"
    else:
        try:
            tempfile.TemporaryFile(dir=probe).close()
        except OSError as err:
            problem = f"{probe} cannot be written ({err.strerror or err})"
    if problem:
        raise ConfigError(f"{key}={p}: {problem}; choose another {key}")


def check_file(path: Any, key: str, what: str) -> Path:
    """An existing file named by ``key``."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise MissingFileError(f"{key}={p} does not exist; give {what}")
    if not p.is_file():
        raise MissingFileError(f"{key}={p} is a folder; give {what}")
    return p


def check_checkpoint(path: Any, key: str) -> dict[str, Any]:
    """The recipe of the covidqu checkpoint named by ``key`` (read safely, never unpickled)."""
    from covidqu.models.checkpoint import read_checkpoint

    check_file(path, key, "a run's checkpoints/best.ckpt")
    return read_checkpoint(path, key=key)["covidqu"]


def check_checkpoints(value: Any, key: str) -> dict[str, Any]:
    """The recipe of the checkpoint, or of the first of an ensemble's, named by ``key`` (one
    path or a list); an ensemble's members must share task and preprocessing."""
    return checkpoint_recipes(value, key)[0]


def checkpoint_recipes(value: Any, key: str) -> list[dict[str, Any]]:
    """The recipes of the checkpoints ``key`` names (one, or an ensemble's, checked as
    :func:`check_checkpoints` checks them)."""
    from covidqu.models.ensemble import check_members, checkpoint_paths

    paths = checkpoint_paths(value, key)
    recipes = [check_checkpoint(p, key) for p in paths]
    check_members(recipes, paths, key)
    return recipes


def refuse_empty_lists(cfg: DictConfig, *keys: str) -> None:
    """An empty list of checkpoints (``'ckpt_path=[]'``) is refused as such, not as missing."""
    from covidqu.models.ensemble import checkpoint_paths, is_ensemble

    for key in keys:
        if is_ensemble(cfg.get(key)):
            checkpoint_paths(cfg[key], key)


def require(cfg: Mapping[str, Any], keys: Iterable[str], usage: str) -> None:
    """Refuse a config that leaves one of ``keys`` unset, with the command line that sets them."""
    for key in keys:
        if not cfg.get(key) or cfg.get(key) == "???":
            raise ConfigError(f"{key} is required: {usage}")


#: The commands that check their config up front, by config name: each has
#: ``covidqu.<command>.checks.check(cfg, out_dir, overrides)``.
COMMANDS = ("train", "eval", "predict", "analyze", "export")


def preflight(cfg: DictConfig, command: str, out_dir: Path, overrides: Iterable[str]) -> None:
    """Run ``command``'s up-front checks on ``cfg``; a :class:`UserError` on the first failure."""
    importlib.import_module(f"covidqu.{command}.checks").check(cfg, out_dir, overrides)


class Preflight(Callback):
    """Hydra callback: :func:`preflight` before Hydra creates or writes the run folder.

    A refused command prints ``error: ...`` and exits 2 with nothing written.
    """

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **_: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if config_name not in COMMANDS:
            return
        HydraConfig.instance().set_config(config)  # lets ${hydra:...} values resolve
        overrides = list(config.hydra.overrides.task)
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        self._run(task, config_name, Path(str(config.hydra.run.dir)), overrides)

    def on_multirun_start(self, config: DictConfig, **_: Any) -> None:
        self._run(config, None, Path(str(config.hydra.sweep.dir)), [])

    @staticmethod
    def _run(cfg: DictConfig, command: str | None, out_dir: Path, overrides: list[str]) -> None:
        try:
            if command is None:  # a sweep: each job checks its own config when it starts
                check_output_dir(out_dir, "hydra.sweep.dir")
            else:
                preflight(cfg, command, out_dir, overrides)
        except UserError as err:
            report(err)
            sys.exit(err.exit_code)
