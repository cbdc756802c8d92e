"""How long training waits for its batches: ``perf/data_wait`` and ``perf/samples_per_s``.

A training step's *data wait* is the time between the end of one step and the start of the
next, during which Lightning fetches the next batch from the loader, moves it to the device and
runs ``on_after_batch_transfer`` (uint8 batches made float, ``augment=gpu_*``): everything the
model waits for that is not the model. On a GPU the host runs ahead of the device, so host
clocks would count a fetch the GPU never waited for; there the wait is read from CUDA events on
the GPU's own timeline instead: from the end of a step's work to the moment the next batch was
handed over, which is zero where the GPU was still busy when it arrived (the fetch overlapped
the work) and the GPU's idle time where it was not.

Each epoch logs the share of its time spent waiting (0 to 1; the first step of an epoch, which
also waits for the loader's workers to start, is left out) and the samples trained a second,
for the whole job (summed over DDP processes), to every logger (the CSV included). After the
first epochs, one line tells where the wait is above ``warn_above`` and what to change.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

#: The metric names, logged once an epoch (docs/training.md, metric names).
DATA_WAIT, SAMPLES_PER_S = "perf/data_wait", "perf/samples_per_s"


def batch_size(batch: Any) -> int:
    """The number of samples of a batch of the batch contract (its ``image``); 0 for the
    ``None`` a loader gives where every sample of a batch was left out."""
    return 0 if batch is None else len(batch["image"])


def hints(datamodule: Any, on_gpu: bool, processes: int = 1) -> list[str]:
    """The settings that feed a model faster, less those the run already has: more loader
    workers where the node has idle cores, the packed cache, augmentation on the GPU."""
    found = []
    workers = getattr(datamodule, "num_workers", None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spare = (cores or 1) // max(processes, 1) - 1  # a core for the training process itself
    if workers is not None and workers < spare:
        found.append(f"data.num_workers={spare} (now {workers})")
    if getattr(datamodule, "cache", "packed") != "packed":
        found.append("data.cache=packed (decode every image once, not every epoch)")
    if on_gpu and getattr(datamodule, "augment", None):
        found.append("augment=gpu_light (augment whole batches on the GPU, not per sample)")
    return found


class DataWaitMeter(pl.Callback):
    """The share of training time spent waiting for batches, and samples a second.

    Args:
        warn_above: the share of an epoch above which the hint line is printed (0.10: 10 %).
        hint_epochs: the hint is printed at most once, at the end of one of the first
            ``hint_epochs`` epochs (the first may be slow for reasons of its own: compilation,
            cuDNN's benchmark, a cold file cache).
    """

    def __init__(self, warn_above: float = 0.10, hint_epochs: int = 2) -> None:
        if not 0.0 <= warn_above <= 1.0:
            raise ValueError(f"callbacks.data_wait.warn_above must be in [0, 1], got {warn_above}")
        self.warn_above = warn_above
        self.hint_epochs = hint_epochs
        self.hinted = False
        self._reset()

    def _reset(self) -> None:
        self.waited = 0.0  # seconds (host clock; CUDA events are summed at the epoch's end)
        self.samples = 0
        self.first_start: float | None = None  # when the epoch's first step started
        self.last_end: float | None = None  # when its latest step ended
        self.end_event: Any = None  # CUDA: the previous step's end on the GPU's timeline
        self.events: list[tuple[Any, Any]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
        elif self.end_event is not None:
            handed = torch.cuda.Event(enable_timing=True)
            handed.record()
            self.events.append((self.end_event, handed))
        elif self.last_end is not None:
            self.waited += now - self.last_end

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.samples += batch_size(batch)
        if pl_module.device.type == "cuda":
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.end_event.record()
        self.last_end = time.perf_counter()

    def measured(self) -> tuple[float, float] | None:
        """This epoch's (data wait share, samples a second of this process) so far; None
        before two steps have run."""
        if self.first_start is None or self.last_end is None or self.last_end <= self.first_start:
            return None
        if self.end_event is not None:
            self.end_event.synchronize()
        waited = self.waited + sum(end.elapsed_time(handed) for end, handed in self.events) / 1e3
        elapsed = self.last_end - self.first_start
        return min(waited / elapsed, 1.0), self.samples / elapsed

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figures = self.measured()
        if figures is None:
            return
        share, samples_s = figures
        # the job's throughput is the sum of its processes'; its wait, their mean
        pl_module.log(DATA_WAIT, share, on_epoch=True, sync_dist=True)
        pl_module.log(SAMPLES_PER_S, samples_s, on_epoch=True, sync_dist=True, reduce_fx="sum")
        if self.hinted or trainer.current_epoch >= self.hint_epochs or not trainer.is_global_zero:
            return
        if share > self.warn_above:
            self.hinted = True
            on_gpu = pl_module.device.type == "cuda"
            suggestions = hints(trainer.datamodule, on_gpu, trainer.world_size)
            log.warning(
                "training waited for its batches %.0f %% of epoch %d (%.0f samples/s): the "
                "model is starved; %s",
                100 * share,
                trainer.current_epoch,
                samples_s,
                "try " + ", ".join(suggestions) if suggestions else "the loader is the limit",
            )
