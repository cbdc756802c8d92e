"""Shared fixtures: a small synthetic tree, and the real data shipped beside the project."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from covidqu.data.synth import generate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Real COVID-QU-Ex data lives beside the project, never inside it.
SHARED_DATA = Path(os.environ.get("COVIDQU_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
SAMPLE_ROOT = SHARED_DATA / "covidqu-sample"
REAL_ROOT = SHARED_DATA / "covidqu-real"

SYNTH_PER_CLASS = 3
SYNTH_SIZE = 48


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic tree: both subsets, 3 images per split and class, 48 px. Do not modify."""
    out = tmp_path_factory.mktemp("synth") / "covidqu"
    return generate(out, per_class=SYNTH_PER_CLASS, size=SYNTH_SIZE, seed=0)


@pytest.fixture(scope="module")
def module_tmp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """``mktemp`` for the runs a module's tests share, removed once they have all passed.

    A tiny run still keeps two checkpoints of about 170 MB (weights and optimiser state), so a
    whole suite's would fill a small disk. Function-level folders go the same way through
    ``tmp_path_retention_policy``; a module with a failure keeps its folders for inspection.
    """
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic tree that a test may break."""
    dst = tmp_path / "copy"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The small real tree of both subsets; skips where it is absent."""
    if not SAMPLE_ROOT.is_dir():
        pytest.skip(f"real sample data not found at {SAMPLE_ROOT} (set COVIDQU_SHARED_DATA)")
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real Train/Val splits of the infection subset; skips where they are absent."""
    if not REAL_ROOT.is_dir():
        pytest.skip(f"real infection data not found at {REAL_ROOT} (set COVIDQU_SHARED_DATA)")
    return REAL_ROOT


@pytest.fixture(autouse=True)
def _no_dataset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their data explicitly: a user's COVIDQU_ROOT must not leak in."""
    monkeypatch.delenv("COVIDQU_ROOT", raising=False)
