"""covidqu's Optuna sweeper (``conf/hparams_search/optuna.yaml``), named where Hydra looks.

Hydra instantiates a sweeper only from a class in the ``hydra_plugins`` package; the work is
done by :class:`covidqu.runtime.sweeper.ResumingSweeper`. Nothing heavy is imported here: Hydra
imports every plugin module at the start of every command.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

# Importing optuna (Hydra does, to build the sampler, before this sweeper exists) imports
# alembic, which logs a line for each plugin of its own: noise in a search's log.
logging.getLogger("alembic").setLevel(logging.WARNING)


class ResumingOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's ``OptunaSweeper`` (same settings) whose study resumes."""

    def __init__(self, **settings: Any) -> None:
        from covidqu.runtime.sweeper import ResumingSweeper  # optuna: only when a search runs

        self.sweeper = ResumingSweeper(**settings)
