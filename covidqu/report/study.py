"""The figures of an Optuna search (``hparams_search=optuna``) from the study in its folder:
how the best value moved over the trials, and which parameters mattered."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from covidqu.runtime.outputs import STUDY_FILE

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

#: The seed of the importances' random forest (Optuna's mean decrease in impurity evaluator;
#: its default, fANOVA, fails in optuna 2.10 on the scikit-learn trees of today).
IMPORTANCE_SEED = 0


def study_figures(folder: Path) -> list[tuple[str, bytes]]:
    """``[(title, PNG bytes)]``: for each single-objective study in ``folder``'s study file,
    its optimisation history and, once trials have completed, its parameter importances;
    ``[]`` where ``folder`` holds no study file."""
    path = Path(folder) / STUDY_FILE
    if not path.is_file():
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{path.resolve()}"
    figures = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if len(study.directions) > 1:
            log.info("study %r has several objectives: no figures drawn", study.study_name)
            continue
        name = study.study_name
        figures.append((f"Optuna study {name}: optimisation history", _history(study)))
        importance = _importances(study)
        if importance is not None:
            figures.append((f"Optuna study {name}: parameter importances", importance))
    return figures


def _history(study: optuna.Study) -> bytes:
    """Optuna's own plot of each trial's value and the best so far."""
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization.matplotlib import plot_optimization_history

    from covidqu.files import bytes_of

    # rc_context: optuna sets pyplot's style for the whole process; this puts it back
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ax = plot_optimization_history(study)
        fig = ax.figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        png = bytes_of(lambda buffer: fig.savefig(buffer, format="png", dpi=100))
        plt.close(fig)
    return png


def _importances(study: optuna.Study) -> bytes | None:
    """A bar chart of Optuna's parameter importances; ``None`` while they cannot be computed
    (no completed trial, or no parameter that every completed trial has)."""
    import optuna

    from covidqu.files import bytes_of
    from covidqu.scoring.plots import figure

    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=IMPORTANCE_SEED)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as err:
        log.info("no parameter importances for study %r: %s", study.study_name, err)
        return None
    if not importances:
        return None
    # drawn here: optuna 2.10's plot_param_importances calls matplotlib's removed cm.get_cmap
    names = list(importances)[::-1]  # the most important at the top
    fig = figure(7, 0.8 + 0.45 * len(names))
    ax = fig.add_subplot()
    bars = ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("importance (share of the objective's variation)")
    ax.set_title(f"Parameter importances: {study.study_name}")
    return bytes_of(lambda buffer: fig.savefig(buffer, format="png"))
