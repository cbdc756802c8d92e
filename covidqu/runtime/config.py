"""Reading a composed config and its command line: the keys a user set, the config printed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

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


@rank_zero_only
def print_config(cfg: DictConfig, saved: Path | None = None) -> None:
    """Say where the resolved config was written (``saved``), in one line; print it all
    where ``print_config=true`` (or where it was not written)."""
    if saved is not None and not cfg.get("print_config", False):
        log.info("config: %s (print_config=true prints it here)", saved)
        return
    from rich.console import Console
    from rich.syntax import Syntax

    text = OmegaConf.to_yaml(cfg, resolve=True)
    Console().print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
