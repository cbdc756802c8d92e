"""Checkpoints written whole or not at all, and the best one without what only a resume needs.

Lightning's own writer serialises a checkpoint into memory, then copies it to its final name
through fsspec, which stages it in the system's temporary folder (often another file system)
and copies it over the destination: a full disk there leaves a truncated file under the final
name, in place of the good one it replaced. :class:`AtomicCheckpointIO`, the ``CheckpointIO``
plugin of every trainer config (``conf/trainer/default.yaml``), writes it beside its final name
and renames it into place (:func:`covidqu.files.write_atomic`): ``best.ckpt``, ``last.ckpt``,
per-epoch checkpoints and the one saved on an interrupt alike. It checks the free space first,
so a checkpoint that cannot fit is refused before a byte is written.

:class:`WeightsCheckpoint` (``callbacks.model_checkpoint``, which writes ``best.ckpt``) keeps the
weights and the recipe but not the optimizer's and scheduler's state, which only a resume reads
(resuming uses ``last.ckpt``): a third of the file for Adam's two moments per weight.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

from covidqu.files import bytes_of, write_atomic

#: The entries of a checkpoint that only resuming training reads: Lightning's optimizer and
#: scheduler states, and the raw weights and count of the moving average (``ema=true``), whose
#: ``state_dict`` already holds the average that evaluation uses.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "current_model_state", "averaging_state")

# Set while a WeightsCheckpoint saves: the writer below then leaves TRAINING_STATE out.
_WEIGHTS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("weights_only", default=False)


def holds_training_state(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint can resume training (Lightning restores its optimizers
    from ``optimizer_states``)."""
    return "optimizer_states" in checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO`, except that a checkpoint is written atomically
    (a :class:`~covidqu.files.DiskFullError` when it does not fit), without
    :data:`TRAINING_STATE` when a :class:`WeightsCheckpoint` writes it, and read with
    ``weights_only=True`` whoever asks; removing is Lightning's own."""

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any = lambda storage, loc: storage,  # Lightning's: where it was saved
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # Every file Lightning reads through the trainer: a resume, and also the state its LR
        # finder saved and restores (it asks for torch's default, which an environment variable
        # can turn into unpickling anything). A covidqu checkpoint holds tensors and plain values.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:  # as Lightning's own writer answers
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if _WEIGHTS_ONLY.get():
            checkpoint = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
        write_atomic(path, bytes_of(lambda buffer: torch.save(checkpoint, buffer)))


class WeightsCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` whose files leave out :data:`TRAINING_STATE`.

    Not ``save_weights_only=True``: Lightning then skips every callback's ``on_save_checkpoint``,
    and the moving average of the weights (``ema=true``) would not become the file's
    ``state_dict``. Here the checkpoint is made in full, hooks and all, and
    :class:`AtomicCheckpointIO` drops the training state as it writes the file.
    """

    _warned = False

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        writer = trainer.strategy.checkpoint_io
        if not isinstance(writer, AtomicCheckpointIO) and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{type(writer).__name__} writes {filepath} with the optimizer state: only the "
                "AtomicCheckpointIO plugin (trainer.plugins, conf/trainer/default.yaml) leaves "
                "it out"
            )
        token = _WEIGHTS_ONLY.set(True)
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            _WEIGHTS_ONLY.reset(token)
