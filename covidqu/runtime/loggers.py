"""Experiment loggers across a run: the config logged once, the final figures beside it, each
job's W&B run ended, and a CSV log that a resumed run appends to (W&B itself:
:mod:`covidqu.runtime.wandb_logger`; TensorBoard: :mod:`covidqu.runtime.tensorboard_logger`).

Hydra's basic launcher runs every job of a multirun in one process, so the training code calls
:func:`finish_loggers` at the end of each job (the next job then starts a fresh W&B run and
TensorBoard writer), :func:`log_config` once the trainer is built (the whole resolved config
becomes the run's hyper-parameters, in every logger) and :func:`log_final` once the final
figures are known (TensorBoard's HPARAMS view shows them beside the config).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from covidqu.files import atomic_path, atomic_text
from covidqu.runtime.tensorboard_logger import log_final_figures
from covidqu.runtime.wandb_logger import CXRWandbLogger

log = logging.getLogger(__name__)

# -- per-job helpers ------------------------------------------------------------------------------


def _as_list(loggers: Any) -> list[Logger]:
    if loggers is None or loggers is False:
        return []
    if hasattr(loggers, "loggers"):  # a Trainer
        return list(loggers.loggers)
    if isinstance(loggers, Logger):
        return [loggers]
    return [lg for lg in loggers if isinstance(lg, Logger)]


def _config_dict(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as err:  # an interpolation that only resolves inside Hydra
        log.warning("logging the config unresolved: %s", err)
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


@rank_zero_only
def log_config(loggers: Any, cfg: DictConfig | dict[str, Any]) -> None:
    """Log the whole resolved config as hyper-parameters to every logger (rank zero only).

    ``loggers``: a list of Lightning loggers, one logger, or a Trainer.
    """
    targets = _as_list(loggers)
    if not targets:
        return
    params = _config_dict(cfg)
    params.pop("hydra", None)
    for logger in targets:
        try:
            logger.log_hyperparams(params)
        except Exception as err:  # one logger's trouble must not stop the run
            log.warning("could not log the config to %s: %s", type(logger).__name__, err)


def log_final(loggers: Any, cfg: DictConfig | dict[str, Any], metrics: Any, step: int) -> None:
    """The config with the final figures of ``metrics`` (those of ``metrics.json``) at ``step``,
    where a logger shows them together: TensorBoard's HPARAMS view (rank zero only)."""
    targets = [lg for lg in _as_list(loggers) if isinstance(lg, TensorBoardLogger)]
    if not targets:
        return
    params = _config_dict(cfg)
    params.pop("hydra", None)
    log_final_figures(targets, params, metrics, step)


def finish_loggers(loggers: Any, failed: bool | None = None) -> None:
    """End the W&B run of this job, so that the next job of a multirun starts a fresh one, and
    close the TensorBoard writers (their event files complete).

    ``failed``: mark the run failed; ``None``: failed when an exception is being handled (as in
    a ``finally:`` block after an error). Safe to call on any rank and with any loggers.
    """
    if failed is None:
        failed = sys.exc_info()[0] is not None
    exit_code = 1 if failed else 0
    for logger in _as_list(loggers):
        if isinstance(logger, TensorBoardLogger):
            try:
                logger.finalize("failed" if failed else "success")
            except Exception as err:
                log.warning("could not close the TensorBoard writer: %s", err)
        if not isinstance(logger, WandbLogger):
            continue
        run = getattr(logger, "_experiment", None)
        if run is None or not hasattr(run, "finish"):
            continue
        command = logger.sync_command() if isinstance(logger, CXRWandbLogger) else None
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("could not finish the W&B run: %s", err)
        if command:
            log.info("W&B run saved offline; upload it with: %s", command)
    wandb = sys.modules.get("wandb")  # only when something imported it: no import cost otherwise
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("could not finish the W&B run: %s", err)


# -- CSV ---------------------------------------------------------------------------------------


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, whose files are replaced whole (:mod:`covidqu.files`): a full
    disk or a kill while it writes leaves the rows written before, never a half row.

    Lightning appends each batch of rows to ``metrics.csv``; here the file is rewritten, with
    the new rows, to a temporary file that replaces it. It holds one row per logging step, so
    this costs little beside a training step.
    """

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        rows: list[dict[str, Any]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        with atomic_text(self.metrics_file_path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows([*rows, *self.metrics])
        self.metrics = []

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_path(Path(self.log_dir) / self.NAME_HPARAMS_FILE) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that resuming in the same folder keeps the earlier rows,
    and its files are written atomically (:class:`AtomicExperimentWriter`).

    Lightning deletes an existing ``metrics.csv`` when its writer starts; a run resumed in its
    own folder (``auto_resume``, a requeued Slurm job) would lose the history of the epochs
    before the interruption. Here the file is kept and the new rows are appended to it.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept = path.with_name(".metrics.csv.resumed")
        if path.is_file():
            os.replace(path, kept)
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        if kept.is_file():
            with open(kept, newline="") as fh:
                header = next(csv.reader(fh), [])
            os.replace(kept, path)
            experiment.metrics_keys = list(header)
        return experiment

    @rank_zero_only
    def drop_rows_from(self, step: int) -> int:
        """Remove the rows logged at ``step`` or later (written and pending); how many went.

        A run that resumes from a checkpoint trains those steps again and logs them anew; rows
        an earlier attempt wrote after that checkpoint (before it was killed, or when an older
        checkpoint is resumed) would otherwise stay beside the new ones.
        """
        writer = self.experiment
        pending = [row for row in writer.metrics if int(row.get("step", 0)) < step]
        dropped = len(writer.metrics) - len(pending)
        writer.metrics = pending
        path = Path(writer.metrics_file_path)
        if not path.is_file():
            return dropped
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return dropped
        with atomic_text(path, newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        return dropped + len(rows) - len(kept)


class CSVResume(Callback):
    """At the start of training, drop the CSV rows of the steps about to be trained.

    They are the steps from the checkpoint resumed (``trainer.global_step``; the CSV's ``step``
    column counts optimizer steps too) onwards: a fresh start in a used folder drops them all.
    Cutting by step, not by the number of rows written when the checkpoint was saved, keeps the
    rows of an epoch's end (train epoch figures) that Lightning logs just after its end-of-epoch
    checkpoint, and which a resumed run does not log again.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                dropped = logger.drop_rows_from(trainer.global_step)
                if dropped:
                    log.info(
                        "dropped %s rows of %s logged at step %s or later: this run trains "
                        "those steps again",
                        dropped,
                        Path(logger.log_dir) / "metrics.csv",
                        trainer.global_step,
                    )
