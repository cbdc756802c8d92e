"""Stopping a run on SIGTERM or Ctrl-C with a checkpoint of that moment, and saying how to resume.

Lightning already stops on SIGTERM: its handler sets ``trainer.received_sigterm`` and the loops
raise ``SIGTERMException`` at the end of the batch under way (or, in validation, of the
validation batch under way), which reaches every callback's ``on_exception``. A first Ctrl-C
would instead raise ``KeyboardInterrupt`` wherever the code happens to be, in the middle of a
step. :class:`StopOnSignal` routes both signals through Lightning's SIGTERM path, but only at
points where the run's state is whole (after an optimizer step, never inside a validation, which
a resumed run could not finish), then saves ``checkpoints/last.ckpt`` there. ``train`` turns the
stop into :class:`~covidqu.errors.RunInterrupted`, whose message has the resume command.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from covidqu.errors import RunInterrupted
from covidqu.runtime.config import split_override

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Overrides left out of the resume command: they would restart or resume from elsewhere
#: instead of from the run folder's own last.ckpt.
_NOT_RESUMED = ("ckpt_path", "auto_resume", "hydra.run.dir")


class StopOnSignal(pl.Callback):
    """On SIGTERM or a first Ctrl-C, stop training at the next whole state and checkpoint it.

    The signal is only noted when it arrives; it is passed on to Lightning after the current
    batch's optimizer step (mid-epoch), or after the validation that follows the batch, or at the
    epoch's end. The checkpoint then holds the state a resumed run continues from exactly (with
    :class:`~covidqu.data.loading.ResumableLoader`, the position in the epoch too). A second
    Ctrl-C stops at once, as Python would, keeping only the checkpoints saved before. Under DDP the
    processes agree on the batch to stop after (any process's signal counts), so that they save
    together; only rank zero writes the file.

    Args:
        checkpoint: the file to save, the run folder's ``checkpoints/last.ckpt``, from which
            ``auto_resume`` continues.
    """

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signal: str | None = None  # the first SIGTERM / SIGINT received
        self.at: tuple[int, int] | None = None  # (epoch, global step) when training stopped
        self.saved = False  # whether the checkpoint of that moment was written
        self._passed_on = False
        self._training = False
        self._saving = False
        self._previous: dict[int, Any] = {}
        self._lightning_sigterm: Any = None

    # -- signals ---------------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
        for signum in _SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            log.warning(
                "%s received: training stops after this batch (or the validation under way) "
                "and saves %s%s",
                self.signal,
                self.checkpoint,
                "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else "",
            )
        elif signum == signal.SIGINT and not self._saving:
            raise KeyboardInterrupt

    def _pass_on(self, trainer: pl.Trainer) -> None:
        """Hand a noted signal to Lightning's SIGTERM handling; a collective call under DDP."""
        wanted = self.signal is not None
        if trainer.world_size > 1:
            wanted = trainer.strategy.reduce_boolean_decision(wanted, all=False)
        if not wanted or self._passed_on:
            return
        self._passed_on = True
        self.signal = self.signal or "SIGTERM"  # another process's signal
        if callable(self._lightning_sigterm):
            self._lightning_sigterm(signal.SIGTERM, None)
        if not trainer.received_sigterm:  # Lightning's handler was not installed (not main thread)
            trainer._signal_connector.received_sigterm = True

    # -- when ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now (after on_fit_start).
        self._training = True
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, _: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _whole_after(trainer, batch_idx):
            self._pass_on(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._pass_on(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pass_on(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.signal = self.signal or "SIGTERM"  # before training: Lightning's own handler
            if self._training:
                self._saving = True
                trainer.save_checkpoint(self.checkpoint)
                self.saved = True
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        if self.signal is not None:
            self.at = (int(trainer.current_epoch), int(trainer.global_step))
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # -- what the user is told -------------------------------------------------------------------

    def interruption(self, out_dir: Path) -> RunInterrupted | None:
        """The error that ends the command when a signal stopped training, else ``None``."""
        if self.signal is None:
            return None
        return interrupted(self.signal, out_dir, self.checkpoint, self.at, self.saved)


def _whole_after(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether stopping right after this training batch leaves a state a resumed run continues
    exactly: the optimizer has stepped, and no validation follows the batch."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:
        return False  # the epoch's validation and end come next: stop after those
    if (batch_idx + 1) % trainer.accumulate_grad_batches:
        return False  # gradients of this accumulation would be lost
    every = trainer.val_check_batch
    return not (isinstance(every, int) and (batch_idx + 1) % every == 0)


def interrupted(
    signal_name: str,
    out_dir: Path,
    checkpoint: Path | None = None,
    at: tuple[int, int] | None = None,
    saved: bool = False,
) -> RunInterrupted:
    """:class:`RunInterrupted` saying where the run stopped, what it kept and how to resume."""
    where = f"at epoch {at[0]}, step {at[1]}" if at else "outside training"
    checkpoint = checkpoint or out_dir / "checkpoints" / "last.ckpt"
    if saved:
        kept = f"checkpoint kept: {checkpoint}"
    elif checkpoint.is_file():
        kept = f"checkpoint kept: {checkpoint} (the last one saved before the signal)"
    else:
        kept = "checkpoint kept: none (no checkpoint was saved yet; resuming starts over)"
    command = resume_command(out_dir)
    return RunInterrupted(
        f"interrupted by {signal_name} {where}; {kept}; resume with: {command}", signal_name
    )


def resume_command(out_dir: Path, overrides: list[str] | None = None) -> str:
    """The command that continues this run in its folder: the run's own overrides (those of
    this job, in a sweep) and ``hydra.run.dir``, so that ``auto_resume`` picks up last.ckpt."""
    if overrides is None:
        overrides = _job_overrides()
    kept = [o for o in overrides if split_override(o)[0] not in _NOT_RESUMED]
    words = ["python", "-m", "covidqu.train", *kept, f"hydra.run.dir={out_dir}"]
    return " ".join(shlex.quote(w) for w in words)


def _job_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # not under Hydra: the command line is the config itself
        return []
