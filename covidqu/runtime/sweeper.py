"""The Optuna search of ``hparams_search=optuna``: a study that resumes where it stopped.

hydra-optuna-sweeper runs ``n_trials`` more trials at every launch, numbers the jobs of each
launch from 0 (a second launch into the same folder writes over the first one's jobs) and
records a job that failed as a completed trial of the worst value. This sweeper keeps its
parameter parsing and trial set-up and changes what a launch does:

- the study lives in an SQLite file in the sweep folder (:data:`STUDY_FILE`, unless
  ``hydra.sweeper.storage`` names another storage) and is loaded when it exists, so re-running
  the same command continues the same study;
- ``n_trials`` is the study's total: a launch runs what the study still lacks, or says that it
  has them all;
- each trial's job folder is its trial number, never one an earlier launch wrote;
- a job that failed (``train`` returns the worst value for the direction and writes
  ``failure.txt``) is recorded as a FAIL trial, one that was interrupted as a FAIL trial marked
  ``interrupted`` that the total leaves out (the next launch runs it again).

Hydra finds sweepers only in the ``hydra_plugins`` package: ``hydra_plugins/covidqu_sweeper.py``
names this one for it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.trial import Trial, TrialState

from covidqu.errors import ConfigError, RunInterrupted
from covidqu.files import write_atomic
from covidqu.runtime.outputs import STUDY_FILE

log = logging.getLogger(__name__)

#: The results of the study so far, rewritten at the end of every launch.
RESULTS_FILE = "optimization_results.yaml"
#: The user attribute of a trial that was interrupted (SIGTERM, Ctrl-C) rather than failed.
INTERRUPTED = "interrupted"


def study_storage(storage: Any, sweep_dir: str | Path) -> Any:
    """The storage of a study: ``storage`` as given, or the SQLite file in ``sweep_dir``."""
    if storage is not None:
        return storage
    path = Path(sweep_dir).expanduser().resolve() / STUDY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
    return f"sqlite:///{path}"


def counted(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """How many trials count towards ``n_trials``: those that ended on their own."""
    return sum(t.state.is_finished() and not t.user_attrs.get(INTERRUPTED) for t in trials)


def consecutive(trials: Sequence[Trial]) -> list[list[Trial]]:
    """``trials`` in runs of consecutive numbers (another process may take numbers between)."""
    runs: list[list[Trial]] = []
    for trial in trials:
        if runs and trial.number == runs[-1][-1].number + 1:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


class ResumingSweeper(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper with a study that resumes (see the module docstring)."""

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(
            [*self._parse_sweeper_params_config(), *arguments]
        )
        if self.search_space_distributions:  # the deprecated hydra.sweeper.search_space
            distributions = {**self.search_space_distributions, **distributions}
        self._grid_sampler(distributions)
        for name in fixed:
            distributions.pop(name, None)
        directions = self._get_directions()
        storage = study_storage(self.storage, self.sweep_dir)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        self._check_resumable(study, directions, distributions, storage)
        study.sampler = self._reseeded(len(study.trials))
        done = counted(study.get_trials(deepcopy=False))
        to_go = max(0, self.n_trials - done)
        log.info(
            "Study %r in %s: %d of hydra.sweeper.n_trials=%d trials done, %d to run",
            study.study_name,
            storage,
            done,
            self.n_trials,
            to_go,
        )
        if not to_go:
            log.info("Nothing to run: raise hydra.sweeper.n_trials to search further")
        while to_go > 0:
            trials = [study.ask() for _ in range(min(self.n_jobs, to_go))]
            overrides = dict(
                zip(
                    (t.number for t in trials),
                    self._configure_trials(trials, distributions, fixed),
                    strict=True,
                )
            )
            for run in consecutive(trials):
                self._launch(study, run, [overrides[t.number] for t in run], directions)
            to_go -= len(trials)
        self._write_results(study, directions)

    def _grid_sampler(self, distributions: dict[str, BaseDistribution]) -> None:
        """A grid sampler is built from the search space, which its trials then cover once."""
        sampler = self.sampler
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {k: self._to_grid_sampler_choices(d) for k, d in distributions.items()}
            self.sampler = sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

    def _reseeded(self, n: int) -> Any:
        """The sampler of a study that has ``n`` trials: seeded ``n`` past its configured seed,
        so that a resumed study does not propose its first launch's trials again."""
        node = self.config.hydra.sweeper.get("sampler")
        grid = isinstance(self.sampler, optuna.samplers.GridSampler)  # it has no random part
        if not n or grid or not node or node.get("seed") is None:
            return self.sampler
        return instantiate(node, seed=int(node.seed) + n)

    def _check_resumable(
        self,
        study: optuna.Study,
        directions: list[str],
        distributions: dict[str, BaseDistribution],
        storage: Any,
    ) -> None:
        """Refuse to continue a study with another direction or another space for a parameter
        it searched (Optuna refuses the latter at the first trial, without the fix)."""
        fix = (
            f"keep the study's search, or start another study with "
            f"hydra.sweeper.study_name=<new name> (the study: {study.study_name!r} in {storage})"
        )
        asked = [d.upper() for d in directions]
        held = [d.name for d in study.directions]
        if asked != held:
            raise ConfigError(f"hydra.sweeper.direction={asked} but the study {held}: {fix}")
        for trial in study.get_trials(deepcopy=False):
            for name, old in trial.distributions.items():
                new = distributions.get(name)
                try:
                    if new is not None:
                        check_distribution_compatibility(old, new)
                except ValueError:
                    raise ConfigError(
                        f"hydra.sweeper.params.{name} searches {new}, but trial {trial.number} "
                        f"searched {old}: {fix}"
                    ) from None

    def _launch(
        self,
        study: optuna.Study,
        trials: list[Trial],
        overrides: list[Sequence[str]],
        directions: list[str],
    ) -> None:
        """Run ``trials`` as jobs numbered like them, and tell the study how each ended."""
        told: list[Trial] = []
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            raised = 0
            for trial, ret in zip(trials, returns, strict=True):
                raised += self._tell(study, trial, ret, directions)
                told.append(trial)
        except BaseException:  # interrupted (a job's SIGTERM or Ctrl-C ends in SystemExit)
            for trial in trials[len(told) :]:
                trial.set_user_attr(INTERRUPTED, True)
                study.tell(trial, state=TrialState.FAIL)
            raise
        if raised / len(returns) > self.max_failure_rate:
            log.error(
                "%d of %d jobs raised (hydra.sweeper.max_failure_rate=%s)",
                raised,
                len(returns),
                self.max_failure_rate,
            )
            for ret in returns:
                ret.return_value  # noqa: B018  (re-raises the job's error)

    @staticmethod
    def _tell(study: optuna.Study, trial: Trial, ret: JobReturn, directions: list[str]) -> bool:
        """Record how ``trial``'s job ended; whether the job raised (rather than returned). An
        interruption propagates, the trial untold."""
        try:
            value = ret.return_value
        except RunInterrupted:
            raise
        except Exception as err:
            log.warning("Trial %d raised %s: %s", trial.number, type(err).__name__, err)
            study.tell(trial, state=TrialState.FAIL)
            return True
        try:
            values = [float(v) for v in (value if len(directions) > 1 else [value])]
        except (TypeError, ValueError):
            values = []
        if len(values) != len(directions) or not all(map(math.isfinite, values)):
            log.warning("Trial %d failed (returned %r): recorded as failed", trial.number, value)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, values=values)
        return False

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        """The best trial(s) so far into the sweep folder, as hydra-optuna-sweeper writes them."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not trials:
            log.warning("No trial of study %r has completed", study.study_name)
            return
        results: dict[str, Any] = {"name": "optuna", "n_trials": counted(study.trials)}
        if len(directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
        else:
            results["solutions"] = [
                {"params": t.params, "values": t.values} for t in study.best_trials
            ]
        path = Path(str(self.config.hydra.sweep.dir)) / RESULTS_FILE
        write_atomic(path, OmegaConf.to_yaml(OmegaConf.create(results)))
