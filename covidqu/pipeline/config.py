"""Checks and adjustments of a composed config before anything is built."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from covidqu.data.synth import ensure_synthetic
from covidqu.errors import ConfigError

log = logging.getLogger(__name__)


def split_override(item: str) -> tuple[str, str]:
    """``(key, value)`` of a command-line override: ``+a.b=1`` and ``a.b=1`` give ``a.b``."""
    key, _, value = item.partition("=")
    return key.lstrip("+~"), value


def user_override_keys(overrides: Iterable[str] | None = None) -> set[str]:
    """Keys the user set on the command line (``a.b=1``, ``+a.b=1``, ``group=option``)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = HydraConfig.get().overrides.task
        except ValueError:  # not running under @hydra.main
            overrides = []
    return {split_override(item)[0] for item in overrides}


def synthetic_overrides(cfg: DictConfig, overrides: Iterable[str] | None = None) -> dict:
    """The ``synthetic.overrides`` a run without a dataset takes: every one the user did not set
    on the command line. Empty when a dataset is configured (``data.root`` or ``COVIDQU_ROOT``)."""
    if cfg.data.get("root") not in (None, ""):
        return {}
    user = user_override_keys(overrides)
    return {
        key: value
        for key, value in (cfg.synthetic.get("overrides") or {}).items()
        if key not in user
    }


def apply_synthetic_defaults(
    cfg: DictConfig, overrides: Iterable[str] | None = None
) -> Path | None:
    """With no dataset configured, generate the synthetic sample once and train briefly on it.

    Sets ``data.root`` to the cached synthetic tree and applies :func:`synthetic_overrides`.
    Returns the tree, or ``None`` when a dataset is configured (``data.root`` or
    ``COVIDQU_ROOT``).
    """
    if cfg.data.get("root") not in (None, ""):
        return None
    changes = synthetic_overrides(cfg, overrides)
    syn = cfg.synthetic
    cache = Path(cfg.paths.cache_dir)
    log.warning(
        "No dataset configured (data.root and COVIDQU_ROOT are unset): training a short demo run "
        "on a synthetic COVID-QU-Ex sample in %s. Set data.root=/path/to/COVID-QU-Ex to train on "
        "the real data.",
        cache,
    )
    root = ensure_synthetic(cache, per_class=syn.per_class, size=syn.size)
    with open_dict(cfg):
        cfg.data.root = str(root)
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return root


def check_config(cfg: DictConfig) -> None:
    """Refuse combinations that cannot work, before any data or model is built."""
    network = cfg.task.get("network")
    builder = str(cfg.model.get("_target_", ""))
    if network and builder != network.builder:
        raise ConfigError(
            f"task={cfg.task.name} needs {network.what}, but the model config builds "
            f"{builder.rsplit('.', 1)[-1]} ({builder}); use {network.choices}"
        )
    for key in (network or {}).get("requires") or []:  # model options the task's module reads
        if cfg.model.get(key) in (None, {}, []):
            raise ConfigError(
                f"task={cfg.task.name} needs model.{key} (set by conf/task/{cfg.task.name}.yaml), "
                f"but it is empty: remove the override of model.{key}, or choose another task"
            )
    monitor = str(cfg.task.monitor)
    if not monitor.startswith(("val/", "train/")):
        raise ConfigError(f"task.monitor={monitor} must name a logged metric such as val/dice")
    if cfg.task.monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode must be min or max, got {cfg.task.monitor_mode}")


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """Print the resolved config once, at the start of a run."""
    from rich.console import Console
    from rich.syntax import Syntax

    text = OmegaConf.to_yaml(cfg, resolve=True)
    Console().print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
