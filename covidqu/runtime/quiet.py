"""Third-party notices a covidqu user cannot act on, kept off the terminal and the logs.

Each is silenced by its own text, never by a blanket filter: every other warning of the same
libraries still reaches the user. :func:`quiet_third_party` is called by every command's entry
point (:func:`covidqu.runtime.cli.command`).
"""

from __future__ import annotations

import logging
import warnings

#: Warnings silenced, by the start of their text (a regular expression) and their category.
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning, wherever Slurm's srun is installed but the command was not started by it: a
    # sweep on Slurm starts its jobs with srun itself (hydra/launcher=slurm), and a command run
    # by hand on a login or interactive node is meant to run there, as it is.
    (r"The `srun` command is available on your system but is not used", UserWarning),
    # torch's deprecation of a class that Lightning's own code still uses (at every fit,
    # validation and test): for Lightning to change, not for a user.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)

#: Log records silenced, by logger name and the start of their text.
RECORDS = (
    # Lightning's adverts for its cloud services ("💡 Tip: ... litlogger", "... litmodels"),
    # printed by every trainer a run builds.
    ("pytorch_lightning.utilities.rank_zero", "💡 Tip:"),
    ("lightning_fabric.utilities.rank_zero", "💡 Tip:"),
    # Lightning's remark that it adds no summary of its own beside the one covidqu's callbacks
    # configure (callbacks.model_summary): about covidqu's choice, at every fit.
    ("pytorch_lightning.utilities.rank_zero", "Trainer already configured with model summary"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party() -> None:
    """Install the filters of :data:`WARNINGS` and :data:`RECORDS` (once; idempotent)."""
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix in RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
