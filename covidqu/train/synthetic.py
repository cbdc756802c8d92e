"""The demo run: with no dataset configured, ``train`` generates a synthetic sample once and
trains briefly on it (``synthetic`` in ``conf/train.yaml``)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from covidqu.data.synth import ensure_synthetic
from covidqu.runtime.config import user_override_keys

log = logging.getLogger(__name__)


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


def with_synthetic_defaults(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """``cfg`` as ``train`` will run it when no dataset is configured (no data generated)."""
    changes = synthetic_overrides(cfg, overrides)
    if not changes:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg
