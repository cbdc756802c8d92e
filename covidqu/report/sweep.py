"""The end of a sweep: one summary of its jobs, and a non-zero exit when any failed."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from covidqu.report.run import SUMMARY, report

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Print the sweep's runs (as ``python -m covidqu.report``) once every job has ended.

    Failed jobs do not stop a sweep (see :func:`covidqu.train.run.train`); this is where
    they are counted: the process exits with status 1 when any job failed, so that scripts and
    schedulers notice.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = [r for r in report(sweep_dir) if r["status"] != SUMMARY]  # runs, not k-fold rows
        failed = [r["run"] for r in table if r["status"] != "completed"]
        if failed:
            log.error(
                "%d of %d jobs did not complete: %s (see failure.txt in each); report in %s",
                len(failed),
                len(table),
                ", ".join(failed),
                sweep_dir / "report.md",
            )
            sys.exit(1)
        log.info("all %d jobs completed; report in %s", len(table), sweep_dir / "report.md")
