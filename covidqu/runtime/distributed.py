"""DDP under Hydra: the re-launched processes of a job run that job, in that job's folder.

Lightning starts DDP processes 1..N-1 by re-running the command line. Under a Hydra multirun that
command line holds the whole sweep (``-m model=unet,fpn``): each extra process would start a
sweep of its own and write stray folders. :func:`use_job_command_for_ddp` makes Lightning
re-launch the current job instead: the same entry point with that job's own overrides, writing
into the job's folder, without a second copy of Hydra's ``.hydra/`` files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def job_subprocess_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command (and working directory) that starts DDP process ``local_rank`` of this job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name={hc.job.name}_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_job_command_for_ddp() -> None:
    """Route Lightning's DDP re-launch through :func:`job_subprocess_command` (idempotent)."""
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    for module in (fabric_launcher, pl_launcher):
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = job_subprocess_command


#: Variables Lightning's launcher sets in its own process when it starts the DDP processes.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def job_scope() -> Iterator[None]:
    """Leave no DDP state behind a job, so the next job of the same sweep starts clean.

    A sweep runs its jobs one after another in one process. Lightning leaves that process's
    process group open and the launch variables set (``LOCAL_RANK`` among them, which would make
    the next job believe its processes already exist): both are undone when a job ends.
    """
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def evaluation_trainer(trainer_cfg: Any, **kwargs: Any) -> Any:
    """A Trainer from the ``trainer`` group that evaluates or predicts only: no logger, no
    checkpoints, no model summary; its DDP processes re-run this job in this job's folder.

    ``eval`` and ``analyze`` take the same group as ``train`` (``trainer=ddp_cpu``,
    ``trainer=ddp trainer.devices=4``); the training-only keys of the group are simply unused.
    """
    from hydra.utils import instantiate

    use_job_command_for_ddp()
    return instantiate(
        trainer_cfg,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )
