"""Training progress: the monitored metric beside the loss, and plain lines in log files.

:func:`progress_bar` is the ``_target_`` of ``callbacks.progress_bar``. On a terminal it gives
Lightning's :class:`RichProgressBar`, showing the monitored metric (``task.monitor``, e.g.
``val/dice``) beside the training loss. Where the output goes to a file (``nohup``, Slurm), a
live bar writes nothing a reader can use, so it gives :class:`LogLines` instead: one plain line
at each epoch's end (epoch, training loss, monitored metric and its best, elapsed time) and,
during long epochs, one every ``every_s`` seconds (or ``every_n_steps`` steps).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

log = logging.getLogger(__name__)


def _with_monitor(
    trainer: pl.Trainer, metrics: dict[str, Any], monitor: str | None
) -> dict[str, Any]:
    # Lightning's bar shows what the module logs with prog_bar=True (the loss), not the
    # metric that picks the best checkpoint: add it once it has been computed.
    value = trainer.callback_metrics.get(monitor) if monitor else None
    if value is not None and monitor not in metrics:
        metrics[monitor] = float(value)
    return metrics


class MonitorRichBar(RichProgressBar):
    """Lightning's Rich progress bar, with the monitored metric among its figures."""

    def __init__(self, monitor: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.monitor = monitor

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _with_monitor(trainer, super().get_metrics(trainer, pl_module), self.monitor)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _figure(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class LogLines(ProgressBar):
    """Progress as plain log lines, at a steady pace, for output that is not a terminal.

    Args:
        monitor: the metric that picks the best checkpoint (``task.monitor``).
        every_s: during an epoch (or a long validation or test), a line at most this often;
            null or 0 for none.
        every_n_steps: also a line every this many training steps; null for none.
    """

    def __init__(
        self,
        monitor: str | None = None,
        every_s: float | None = 60.0,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if every_s is not None and every_s < 0:
            raise ValueError(f"callbacks.progress_bar.every_s must be >= 0, got {every_s}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"callbacks.progress_bar.every_n_steps must be >= 1 or null, got {every_n_steps}"
            )
        self.monitor = monitor
        self.every_s = every_s or None
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started = time.monotonic()
        self._last_line = self._started

    # Lightning turns the bar off on every process but the first.
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _say(self, text: str) -> None:
        self._last_line = time.monotonic()
        log.info("%s (elapsed %s)", text, _clock(self._last_line - self._started))

    def _due(self, step: int | None = None) -> bool:
        if step is not None and self.every_n_steps and step % self.every_n_steps == 0:
            return True
        return bool(self.every_s) and time.monotonic() - self._last_line >= self.every_s

    def _epoch(self, trainer: pl.Trainer) -> str:
        last = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        return f"epoch {trainer.current_epoch + 1}/{last}"

    def _best(self, trainer: pl.Trainer, value: float) -> str:
        # The checkpoint callback records this epoch's score after this line is written (it
        # runs last): the best so far is its record or this epoch's value, by its mode.
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) != self.monitor:
                continue
            score = getattr(callback, "best_model_score", None)
            if score is None:
                return ""
            pick = max if getattr(callback, "mode", "min") == "max" else min
            return f" (best {_figure(pick(float(score), value))})"
        return ""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last_line = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not self._enabled or not self._due(i + 1):
            return
        metrics = self.get_metrics(trainer, pl_module)
        loss = metrics.get("train/loss_step", metrics.get("train/loss"))
        total = self.total_train_batches
        of = f"/{total}" if isinstance(total, int) else ""
        said = f", train/loss {_figure(loss)}" if loss is not None else ""
        self._say(f"{self._epoch(trainer)}, step {i + 1}{of}{said}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        metrics = _with_monitor(trainer, self.get_metrics(trainer, pl_module), self.monitor)
        parts = [f"{self._epoch(trainer)} done"]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {_figure(loss)}")
        if self.monitor in metrics:
            value = float(metrics[self.monitor])
            parts.append(f"{self.monitor} {_figure(value)}{self._best(trainer, value)}")
        self._say(", ".join(parts))

    def _evaluating(self, trainer: pl.Trainer, i: int, stage: str, loader: int) -> None:
        if not self._enabled or trainer.sanity_checking or not self._due():
            return
        counts = trainer.num_val_batches if stage == "validation" else trainer.num_test_batches
        total = counts[loader] if loader < len(counts) else None
        of = f"/{total}" if isinstance(total, int) else ""
        self._say(f"{stage}: batch {i + 1}{of}")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluating(trainer, batch_idx, "validation", dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluating(trainer, batch_idx, "test", dataloader_idx)


def writes_to_terminal() -> bool:
    """Whether Rich, which draws the bar, writes to a terminal (or a notebook) here."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


def progress_bar(
    monitor: str | None = None,
    every_s: float | None = 60.0,
    every_n_steps: int | None = None,
    terminal: bool | None = None,
    **rich: Any,
) -> ProgressBar:
    """The progress callback of a run: :class:`MonitorRichBar` on a terminal, :class:`LogLines`
    otherwise (``terminal``: null decides by the output, true or false forces one).
    ``every_s`` and ``every_n_steps`` are :class:`LogLines`'; ``rich``, the Rich bar's
    keyword arguments."""
    if terminal is None:
        terminal = writes_to_terminal()
    if terminal:
        return MonitorRichBar(monitor=monitor, **rich)
    return LogLines(monitor=monitor, every_s=every_s, every_n_steps=every_n_steps)
