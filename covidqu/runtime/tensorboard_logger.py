"""TensorBoard in the run folder: scalars, validation pictures, and the config beside the final
figures in the HPARAMS view.

:class:`CXRTensorBoardLogger` is the ``_target_`` of ``conf/logger/tensorboard.yaml``. It is
Lightning's :class:`~pytorch_lightning.loggers.TensorBoardLogger`, writing its event files into
``<run>/tensorboard/``, with three changes where Lightning's falls short for a run here:

- no placeholder ``hp_metric``: the config is logged when training starts, but the HPARAMS
  entry is written once, when the final figures are known (:func:`log_final_figures`).
  TensorBoard keeps the first HPARAMS entry of a run, so a placeholder written first would hide
  the real one;
- ``hparams.yaml`` is written whole or not at all (:mod:`covidqu.files`);
- a run resumed in its own folder trains again the steps after its checkpoint: TensorBoard is
  told to drop what the earlier attempt logged from that step on (``purge_step`` of torch's
  ``SummaryWriter``), so its curves show each step once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from covidqu.files import atomic_path

log = logging.getLogger(__name__)

#: The folder of the event files inside the run folder.
FOLDER = "tensorboard"


class CXRTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger for one run folder (see the module docstring).

    Args:
        save_dir: the run folder; events go to ``save_dir/name`` (``version=""``: no
            ``version_N`` folder below it, a resumed run continues the same one).
        **kwargs: see :class:`pytorch_lightning.loggers.TensorBoardLogger` (and torch's
            ``SummaryWriter``, e.g. ``flush_secs``).
    """

    def __init__(
        self,
        save_dir: str,
        name: str = FOLDER,
        version: int | str | None = "",
        default_hp_metric: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs
        )

    @rank_zero_only
    def save(self) -> None:
        # Lightning's, with hparams.yaml written atomically
        if self._experiment is not None:
            self._experiment.flush()
        folder = Path(self.log_dir)
        hparams_file = folder / self.NAME_HPARAMS_FILE
        if folder.is_dir() and not hparams_file.is_file():
            with atomic_path(hparams_file) as tmp:
                save_hparams_to_yaml(tmp, self.hparams)

    @rank_zero_only
    def purge_from(self, step: int) -> None:
        """Have TensorBoard drop what this folder holds at ``step`` or later (a resumed run
        logs those steps again): the writer is reopened with torch's ``purge_step``."""
        if step <= 0:
            return
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = step
        _ = self.experiment  # the purge marker is written as the writer opens
        self._kwargs.pop("purge_step")


class TensorBoardResume(Callback):
    """At the start of training, the resumed step to every :class:`CXRTensorBoardLogger`
    (:meth:`~CXRTensorBoardLogger.purge_from`); nothing on a fresh start."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CXRTensorBoardLogger) and trainer.global_step > 0:
                logger.purge_from(trainer.global_step)


def final_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The ``<stage>/<metric>`` figures of ``metrics.json`` that are finite numbers."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if "/" not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


@rank_zero_only
def log_final_figures(
    loggers: list[Any], params: dict[str, Any], metrics: Mapping[str, Any], step: int
) -> None:
    """The config (``params``) with the final figures of ``metrics`` (``metrics.json``'s
    ``val/*`` and ``test/*``), as the HPARAMS entry of every TensorBoard logger, at ``step``
    (the figures are logged as scalars there too, under their own names)."""
    figures = final_figures(metrics)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        try:
            logger.log_hyperparams(params, metrics=figures, step=step)
            logger.experiment.flush()
        except Exception as err:  # one logger's trouble must not stop the run
            log.warning("could not log the final figures to TensorBoard: %s", err)
