"""covidqu's Optuna sweeper (``conf/hparams_search/optuna.yaml``), named where Hydra looks.

Hydra instantiates a sweeper only from a class in the ``hydra_plugins`` package; the work is
done by :class:`covidqu.runtime.sweeper.ResumingSweeper`. Nothing heavy is imported here: Hydra
imports every plugin module at the start of every command.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumingOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's ``OptunaSweeper`` (same settings) whose study resumes."""

    def __init__(self, **settings: Any) -> None:
        from covidqu.runtime.sweeper import ResumingSweeper  # optuna: only when a search runs

        self.sweeper = ResumingSweeper(**settings)
