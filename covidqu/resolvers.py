"""OmegaConf resolvers used by the Hydra configs in ``conf/``.

They derive what one setting implies for another, so that a user changes one key
(``data.target=infection_multiclass``) and the network's outputs, the loss mode and the metrics
follow.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from covidqu.constants import CLASSES, target_info


def seg_outputs(target: str) -> int:
    """Output channels of a segmentation network for a ``data.target``."""
    return target_info(target).num_classes


def seg_mode(target: str) -> str:
    """``binary`` (one sigmoid channel) or ``multiclass`` (softmax over channels)."""
    return target_info(target).mode


def seg_classes(target: str) -> list[str]:
    """Names of a segmentation network's output channels for a ``data.target``."""
    return list(target_info(target).classes)


def covid_class(target: str) -> str | None:
    """The class of a ``data.target`` that only COVID-19 images show (``None`` if none)."""
    return target_info(target).covid_class


def num_classes() -> int:
    """How many image classes there are (COVID-19, Non-COVID, Normal)."""
    return len(CLASSES)


def optuna_direction(monitor_mode: str) -> str:
    """Optuna's ``maximize`` / ``minimize`` for a task's ``max`` / ``min`` monitor mode."""
    directions = {"max": "maximize", "min": "minimize"}
    if monitor_mode not in directions:
        raise ValueError(f"task.monitor_mode must be max or min, got {monitor_mode!r}")
    return directions[monitor_mode]


#: What ``augment`` an Optuna search chooses from; the batch augmentations on the training
#: device join them where the trainer runs on CUDA (on the CPU they would only slow it).
SEARCHED_AUGMENTS = ("none", "light", "strong")
GPU_AUGMENTS = ("gpu_light", "gpu_strong")


def on_cuda(accelerator: str) -> bool:
    """Whether a trainer of ``trainer.accelerator`` runs on a CUDA device."""
    if str(accelerator) in ("gpu", "cuda"):
        return True
    if str(accelerator) != "auto":
        return False
    import torch  # here: composing a config needs no torch otherwise

    return torch.cuda.is_available()


def optuna_augments(accelerator: str) -> str:
    """The Optuna search's ``augment`` choice for ``trainer.accelerator``."""
    choices = SEARCHED_AUGMENTS + (GPU_AUGMENTS if on_cuda(accelerator) else ())
    return f"choice({', '.join(choices)})"


def slurm_tasks(devices: Any) -> int:
    """Slurm tasks per node for ``trainer.devices``: Slurm starts one process per device."""
    if isinstance(devices, list | ListConfig) and devices:  # explicit device indices
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    raise ValueError(
        "hydra/launcher=slurm starts one Slurm task per device, so trainer.devices must be a "
        f"number, not {devices!r}: e.g. trainer=ddp trainer.devices=4 (GPUs), or "
        "trainer=ddp_cpu trainer.devices=2"
    )


def slurm_gpus(accelerator: str, devices: Any) -> int | None:
    """GPUs per node to ask Slurm for: none for CPU runs, else one per device."""
    return None if str(accelerator) == "cpu" else slurm_tasks(devices)


_RESOLVERS = {
    "covidqu.seg_outputs": seg_outputs,
    "covidqu.seg_mode": seg_mode,
    "covidqu.seg_classes": seg_classes,
    "covidqu.num_classes": num_classes,
    "covidqu.covid_class": covid_class,
    "covidqu.optuna_direction": optuna_direction,
    "covidqu.optuna_augments": optuna_augments,
    "covidqu.slurm_tasks": slurm_tasks,
    "covidqu.slurm_gpus": slurm_gpus,
}


def to_plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain dicts and lists, which smp, timm and
    ``weights_only`` checkpoints expect; anything else as it is."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def register_resolvers() -> None:
    """Register the ``${covidqu.<name>:...}`` resolvers used by conf/ (idempotent)."""
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
