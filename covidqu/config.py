"""OmegaConf resolvers used by the Hydra configs in ``conf/``.

They derive what one setting implies for another, so that a user changes one key
(``data.target=infection_multiclass``) and the network's outputs, the loss mode and the metrics
follow.
"""

from __future__ import annotations

from omegaconf import OmegaConf

#: Segmentation targets with more than one foreground class, and their class count.
_MULTICLASS_TARGETS = {"infection_multiclass": 3}


def seg_outputs(target: str) -> int:
    """Output channels of a segmentation network for a ``data.target``."""
    return _MULTICLASS_TARGETS.get(target, 1)


def seg_mode(target: str) -> str:
    """``binary`` (one sigmoid channel) or ``multiclass`` (softmax over channels)."""
    return "multiclass" if target in _MULTICLASS_TARGETS else "binary"


def optuna_direction(monitor_mode: str) -> str:
    """Optuna's ``maximize`` / ``minimize`` for a task's ``max`` / ``min`` monitor mode."""
    directions = {"max": "maximize", "min": "minimize"}
    if monitor_mode not in directions:
        raise ValueError(f"task.monitor_mode must be max or min, got {monitor_mode!r}")
    return directions[monitor_mode]


_RESOLVERS = {
    "covidqu.seg_outputs": seg_outputs,
    "covidqu.seg_mode": seg_mode,
    "covidqu.optuna_direction": optuna_direction,
}


def register_resolvers() -> None:
    """Register the ``${covidqu.<name>:...}`` resolvers used by conf/ (idempotent)."""
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
