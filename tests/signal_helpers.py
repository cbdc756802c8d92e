"""Test-only callbacks: one stops a training run at a chosen batch with a real signal, one
pauses it there while a test acts from outside."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """After batch ``batch`` of epoch ``epoch``: touch ``marker`` (for a test that sends the
    signal from outside) and/or send ``send`` (a signal name) to this process; then wait until
    the run has noted a signal, so that it stops after exactly this batch. Listed before
    covidqu's own callbacks, it runs first at each batch's end."""

    def __init__(
        self, epoch: int, batch: int, marker: str | None = None, send: str | None = None
    ) -> None:
        self.epoch, self.batch = epoch, batch
        self.marker = Path(marker) if marker else None
        self.send = send

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        if self.marker is not None:
            self.marker.write_text(str(os.getpid()))
        if self.send:
            os.kill(os.getpid(), getattr(signal, self.send))
        deadline = time.monotonic() + 120
        while not _noted(trainer) and time.monotonic() < deadline:
            time.sleep(0.02)


def _noted(trainer: pl.Trainer) -> bool:
    """Whether a signal handler has run: covidqu's (StopOnSignal.signal) or Lightning's."""
    return trainer.received_sigterm or any(getattr(cb, "signal", None) for cb in trainer.callbacks)


class PauseAt(pl.Callback):
    """After batch ``batch`` of epoch ``epoch``: touch ``marker``, then wait (at most ten
    minutes) until the file ``until`` exists, so that a test can act while the run is live."""

    def __init__(self, epoch: int, batch: int, marker: str, until: str) -> None:
        self.epoch, self.batch = epoch, batch
        self.marker, self.until = Path(marker), Path(until)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        while not self.until.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
