"""A training loader that a checkpoint taken in the middle of an epoch can resume exactly.

Lightning saves the ``state_dict()`` of every training loader that has one into the fit loop's
checkpoint state and hands it back to ``load_state_dict()`` on resume, but it has no notion of
where inside an epoch a plain DataLoader was: a resumed run would start that epoch again from a
fresh shuffle. Here the order of every epoch is a function of the seed and the epoch alone
(:class:`EpochSampler`), and the loader counts the batches it handed to the training loop
(:class:`ResumableLoader`), so a resumed run sees the rest of the interrupted epoch, in the same
order, and every later epoch as an uninterrupted run would. :func:`build_loader` assembles the
loader of every split from the DataModule's settings: samplers, workers, pinning, bad files.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from covidqu.data.badfiles import BadFileLoader, BadFileLog
from covidqu.errors import DataError

#: ``data.num_workers=auto`` gives at most this many loader processes per device.
AUTO_WORKERS_MAX = 4


def loader_workers(setting: int | str, processes: int = 1) -> int:
    """The loader processes of ``data.num_workers``: a number as given; ``auto``: at most
    :data:`AUTO_WORKERS_MAX`, and no more than the cores this process may use leave, a core
    kept for each training process (Lightning's own suggestion, which counts the usable
    cores with ``os.sched_getaffinity``, and whose warning it then never triggers)."""
    from lightning_fabric.utilities.data import suggested_max_num_workers

    if setting == "auto":
        return min(AUTO_WORKERS_MAX, suggested_max_num_workers(max(int(processes), 1)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"data.num_workers must be auto or an integer >= 0, got {setting!r}")
    return setting


class EpochSampler(DistributedSampler):
    """The training order of one process: a permutation (or a class-balanced draw) per epoch.

    Torch's DistributedSampler already shuffles with a generator seeded by ``seed + epoch`` and
    shards for DDP; Lightning calls :meth:`set_epoch` before each epoch and keeps a
    DistributedSampler it is given instead of injecting its own. Added here: the balanced draw
    (``weights``, with replacement, ``len(dataset)`` samples over all processes, from the same
    generator) and :attr:`skip`, the number of samples the next iteration leaves out at its
    start, which is how a resumed epoch continues.

    Args:
        dataset: the training split.
        seed: with the epoch, fixes the order.
        weights: per-sample weights for a balanced draw; ``None`` for a permutation.
        num_replicas, rank: the DDP world and this process (1 and 0 without DDP).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        weights: Sequence[float] | torch.Tensor | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        if self.weights is None:
            indices = list(super().__iter__())
        else:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(
                self.weights, self.total_size, replacement=True, generator=gen
            ).tolist()
            indices = drawn[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader with the ``state_dict`` / ``load_state_dict`` Lightning saves and restores.

    The state is the epoch under way and how many of its batches the training loop has taken.
    Lightning's fetcher takes batches of a sized loader one at a time, as the loop needs them,
    so batches handed out are batches trained on. The underlying iterator (and its workers) is
    only started at the first ``next()``: Lightning creates a training iterator before it sets
    the sampler's epoch, and a resumed run must know which epoch it is in before it skips.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._served = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self.sampler
        self._epoch = int(getattr(sampler, "epoch", 0))
        self._served = 0
        resume, self._resume = self._resume, None
        if resume and resume["epoch"] == self._epoch and isinstance(sampler, EpochSampler):
            self._served = resume["batches"]
            sampler.skip = resume["batches"] * (self.batch_size or 1)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied by the next iteration if it is of the same epoch (a checkpoint from the middle
        # of an epoch); one saved at an epoch's end resumes with the next epoch, from its start.
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def worker_init(worker_id: int, rank: int | None = None) -> None:
    """Keep a DataLoader worker out of the signals meant for its parent, which handles them.

    A Ctrl-C, or a ``kill`` of the process group, reaches every process of the group; a worker
    that died of it would make the main process fail with "DataLoader worker ... is killed by
    signal" before it could save a checkpoint. So each worker leads a process group of its own,
    which group-wide signals do not reach, and ignores SIGINT. SIGTERM sent to the worker itself
    keeps its default: that is how its parent stops a worker that does not exit when asked (and
    how multiprocessing stops leftover workers at exit: a worker ignoring SIGTERM would hang it).
    A worker whose parent died exits on its own. Lightning's seeding of workers
    (``seed_everything(workers=True)``), which a worker_init_fn of our own replaces, is applied
    here.
    """
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)


def distributed_world() -> int:
    """How many processes run this job (1 outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def distributed_rank() -> int:
    """This process's rank (0 outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def eval_sampler(ds: Dataset, split: str, world: int) -> UnrepeatedDistributedSampler:
    """This process's shard of an evaluation split: every image exactly once over all processes.

    PyTorch's DistributedSampler, which Lightning injects by default, pads the shards with
    repeated images, which would count them twice in split-level figures and per-image rows.
    Lightning's unrepeated sampler gives process ``r`` the images ``r, r + world, ...`` (the
    order the per-image rows are gathered back in), and Lightning keeps a DistributedSampler it
    is given instead of injecting its own.
    """
    if len(ds) < world:
        raise DataError(
            f"the {split} split has {len(ds)} images, fewer than the {world} processes that "
            "evaluate it: every process needs at least one. Evaluate on fewer devices "
            "(trainer.devices, trainer.num_nodes) or on more images (data.limit_per_class)."
        )
    return UnrepeatedDistributedSampler(ds, shuffle=False)


def trains_on_cuda(trainer: Any) -> bool:
    """Whether ``trainer`` (a Lightning Trainer, or None) runs on CUDA devices."""
    from pytorch_lightning.accelerators import CUDAAccelerator

    return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)


class TrainLoader(ResumableLoader, BadFileLoader):
    """The training loader: resumable in the middle of an epoch, and handling unreadable files
    as ``data.on_bad_file`` says (each base class adds one of the two to the DataLoader)."""


def build_loader(
    ds: Dataset,
    split: str,
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    persistent_workers: bool,
    pin_memory: bool,
    bad_files: BadFileLog,
    seed: int,
    balanced: bool,
    drop_last: bool,
) -> BadFileLoader:
    """The loader of ``split``, handling unreadable files as ``bad_files`` says. ``train``: a
    :class:`TrainLoader` in an order fixed by ``seed`` and the epoch (shuffled, or drawn with
    equal probability per class where ``balanced``), each process its share, dropping the last
    incomplete batch where ``drop_last`` and the split holds more than one; otherwise the
    split's order is kept (each process a contiguous share under DDP)."""
    world = distributed_world()
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        kwargs["prefetch_factor"] = 4
        kwargs["worker_init_fn"] = partial(worker_init, rank=distributed_rank())
    kwargs.update(bad_files=bad_files, split=split, training=train)
    if not train:
        sampler = eval_sampler(ds, split, world) if world > 1 else None
        return BadFileLoader(ds, batch_size=batch_size, sampler=sampler, **kwargs)
    weights = None
    if balanced:
        counts = Counter(ds.labels)
        weights = [1.0 / counts[y] for y in ds.labels]
    sampler = EpochSampler(
        ds, seed=seed, weights=weights, num_replicas=world, rank=distributed_rank()
    )
    return TrainLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last and len(ds) > batch_size,
        **kwargs,
    )
