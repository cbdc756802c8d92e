"""An Optuna study's figures for the report page, where a sweep folder holds one."""

from __future__ import annotations

from pathlib import Path


def study_figures(folder: Path) -> list[tuple[str, bytes]]:
    """filled by the Optuna study

    ``(title, PNG bytes)`` for the study's history and its parameter importances when
    ``folder`` (a sweep folder) holds an Optuna study; ``[]`` otherwise.
    """
    return []
