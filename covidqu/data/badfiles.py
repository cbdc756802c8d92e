"""Files that go bad while a run reads them: stop with the file named, or leave them out.

A file that could be read when the run started may be deleted, truncated or emptied later (a
sync job, a full disk, a flaky network mount). ``data.on_bad_file`` says what then happens:

- ``error`` (the default): the run stops with a :class:`BadFileError` that names the file, what
  is wrong with it and the fixes;
- ``skip``: the sample is left out of its batch, a warning names the file once, and the run
  goes on; :meth:`BadFileLog.skipped` lists every file left out.

Decoding happens in DataLoader workers, and an exception raised there reaches the main process
wrapped in the worker's traceback text. So a dataset built with ``mark_bad_files=True`` never
raises for a bad file: it returns a :class:`BadFile` in the sample's place, :func:`collate` sets
those apart from the good samples, and :class:`BadFileLoader`, iterating in the main process,
raises the clean error or records the skip. The same path serves ``num_workers=0``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from covidqu.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The values of ``data.on_bad_file``.
POLICIES = ("error", "skip")


class BadFileError(DataError):
    """A file of the dataset that could not be read during the run."""


@dataclass(frozen=True)
class BadFile:
    """What a dataset gives in place of a sample whose file could not be read.

    Plain strings only: it travels from a DataLoader worker to the main process by pickling.
    """

    path: str
    problem: str


def check_policy(policy: str) -> str:
    """``policy`` if it is a value of ``data.on_bad_file``; a :class:`ConfigError` otherwise."""
    if policy not in POLICIES:
        raise ConfigError(
            f"data.on_bad_file={policy!r} is not one of {'|'.join(POLICIES)}: 'error' stops the "
            "run at an unreadable file, 'skip' leaves it out and goes on"
        )
    return policy


def collate(items: Sequence[Any]) -> tuple[Any, list[BadFile]]:
    """``(batch, bad)``: the good samples collated as usual (``None`` when there are none) and
    the :class:`BadFile` markers of the rest."""
    bad = [item for item in items if isinstance(item, BadFile)]
    good = [item for item in items if not isinstance(item, BadFile)]
    return (default_collate(good) if good else None), bad


class BadFileLog:
    """What a DataModule's loaders met: raises at a bad file, or records it, per ``policy``.

    One log serves every split of a DataModule, so :meth:`skipped` covers a whole run (fit,
    then the final validation and test).
    """

    def __init__(self, policy: str = "error") -> None:
        self.policy = check_policy(policy)
        #: Path -> what was wrong with it, in the order they were met (this process only).
        self.skipped_here: dict[str, str] = {}

    def handle(self, bad: Sequence[BadFile], split: str) -> None:
        """Raise for the first of ``bad`` (``error``), or note and warn once per file (``skip``)."""
        for item in bad:
            if self.policy == "error":
                raise BadFileError(
                    f"a {split} sample could not be loaded during the run: {item.problem}. Restore "
                    "the file (or remove it from the dataset: an image together with its masks), "
                    "or set data.on_bad_file=skip to leave unreadable files out and go on."
                )
            if item.path not in self.skipped_here:
                self.skipped_here[item.path] = item.problem
                log.warning(
                    "skipping a %s file that could not be read (data.on_bad_file=skip): %s",
                    split,
                    item.problem,
                )

    def skipped(self) -> dict[str, str]:
        """Every file skipped so far, over all processes of a distributed run (path -> problem).

        A collective under ``torch.distributed``: every process must call it.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.skipped_here)
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.skipped_here)
        # A union, not a sum: a training shard changes every epoch, so two processes may meet
        # the same bad file.
        merged: dict[str, str] = {}
        for part in parts:
            for path, problem in part.items():
                merged.setdefault(path, problem)
        return merged


class BadFileLoader(DataLoader):
    """A DataLoader over a dataset built with ``mark_bad_files=True``: yields the batches of its
    good samples and hands the bad ones to ``bad_files`` (which may raise).

    A batch with no good sample is yielded as ``None`` (see the batch contract in
    :mod:`covidqu.constants`): Lightning skips a ``None`` training batch itself, our modules
    skip it in evaluation, and the loader keeps its length, which Lightning's loops count on
    (validation runs after the last of ``len(loader)`` batches). Under DDP a skipped training
    step would leave the processes on different steps (a hang), so there it stops with an
    error instead.

    Args:
        bad_files: the log that decides and records (shared by a DataModule's splits).
        split: the split's name, for messages.
        training: whether this loader feeds training steps.
        *args, **kwargs: those of :class:`~torch.utils.data.DataLoader`; ``collate_fn``
            defaults to :func:`collate` (a custom one must return ``(batch, bad)`` too).
    """

    def __init__(
        self,
        *args: Any,
        bad_files: BadFileLog,
        split: str,
        training: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("collate_fn", collate)
        super().__init__(*args, **kwargs)
        self.bad_files = bad_files
        self.split = split
        self.training = training

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        last, yielded = len(self) - 1, 0
        for i, (batch, bad) in enumerate(super().__iter__()):
            if bad:
                self.bad_files.handle(bad, self.split)
            if batch is not None:
                yielded += 1
            elif i == last and yielded == 0:
                # Checked at the last batch: Lightning never asks for one past len(loader).
                raise BadFileError(
                    f"no file of the {self.split} split could be read during the run (e.g. "
                    f"{bad[0].problem}): is data.root still there (an unmounted or emptied "
                    "drive)? Restore the files and start again."
                )
            else:
                self._check_skippable(bad)
            yield batch

    def _check_skippable(self, bad: Sequence[BadFile]) -> None:
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.training and distributed:
            raise BadFileError(
                f"every sample of a {self.split} batch on this process was unreadable (e.g. "
                f"{bad[0].problem}); under DDP one process cannot skip a whole training step "
                "alone. Restore or remove the files, or use a larger data.batch_size."
            )
