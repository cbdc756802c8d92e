"""Checkpoints written whole or not at all: Lightning's checkpoint writer, atomic.

Lightning's own writer serialises a checkpoint into memory, then copies it to its final name
through fsspec, which stages it in the system's temporary folder (often another file system)
and copies it over the destination: a full disk there leaves a truncated file under the final
name, in place of the good one it replaced. :class:`AtomicCheckpointIO`, the ``CheckpointIO``
plugin of every trainer config (``conf/trainer/default.yaml``), writes it beside its final name
and renames it into place (:func:`covidqu.files.write_atomic`): ``best.ckpt``, ``last.ckpt``,
per-epoch checkpoints and the one saved on an interrupt alike. It checks the free space first,
so a checkpoint that cannot fit is refused before a byte is written.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from covidqu.files import bytes_of, write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO`, except that a checkpoint is written atomically
    (a :class:`~covidqu.files.DiskFullError` when it does not fit); loading and removing are
    Lightning's own."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:  # as Lightning's own writer answers
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(path, bytes_of(lambda buffer: torch.save(checkpoint, buffer)))
