"""The end of a sweep: one summary of its jobs, and a non-zero exit when any of its jobs failed."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from covidqu.report.run import DONE, SUMMARY, report, run_folders, run_name

log = logging.getLogger(__name__)


def job_stamps(sweep_dir: Path) -> dict[str, int]:
    """Each job folder under ``sweep_dir``, named as the report names it, with the time its
    config was written: Hydra rewrites ``.hydra/config.yaml`` whenever a job starts there."""
    if not sweep_dir.is_dir():
        return {}
    return {
        run_name(folder, sweep_dir): (folder / ".hydra" / "config.yaml").stat().st_mtime_ns
        for folder in run_folders(sweep_dir)
    }


class SweepSummary(Callback):
    """Print the sweep's runs (as ``python -m covidqu.report``) once every job has ended.

    Failed jobs do not stop a sweep (see :func:`covidqu.train.run.train`); this is where
    they are counted: the process exits with status 1 when any job of this launch failed, so
    that scripts and schedulers notice. Jobs an earlier launch left in the same folder (a
    resumed Optuna study keeps its failed trials) are shown and named, but do not fail this
    launch: otherwise a study with one old failure would exit 1 on every re-run.
    """

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # compared with the folders' own stamps at the end: no clock shared with other nodes
        self._before = job_stamps(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = [r for r in report(sweep_dir) if r["status"] != SUMMARY]  # runs, not k-fold rows
        stamps = job_stamps(sweep_dir)
        ran = {run for run, stamp in stamps.items() if self._before.get(run) != stamp}
        failed = [r["run"] for r in table if r["status"] not in DONE and r["run"] in ran]
        earlier = [r["run"] for r in table if r["status"] not in DONE and r["run"] not in ran]
        if earlier:
            log.warning(
                "%d job(s) of an earlier launch in this folder did not complete: %s",
                len(earlier),
                ", ".join(earlier),
            )
        if failed:
            log.error(
                "%d of %d jobs of this launch did not complete: %s (see failure.txt in each); "
                "report in %s",
                len(failed),
                len(ran),
                ", ".join(failed),
                sweep_dir / "report.md",
            )
            sys.exit(1)
        log.info(
            "all %d jobs of this launch completed; report in %s", len(ran), sweep_dir / "report.md"
        )
