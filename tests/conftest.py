"""Shared fixtures: a small synthetic tree, tiny trained runs, and the real data shipped beside
the project."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from covidqu.data.synth import generate

from shared_folders import SharedFolders, session_base

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Real COVID-QU-Ex data lives beside the project, never inside it.
SHARED_DATA = Path(os.environ.get("COVIDQU_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
SAMPLE_ROOT = SHARED_DATA / "covidqu-sample"
REAL_ROOT = SHARED_DATA / "covidqu-real"

SYNTH_PER_CLASS = 3
SYNTH_SIZE = 48


#: The tiny runs tests share (read-only; see ``trained_run``): kind -> the overrides after
#: ``pipeline_helpers.TINY`` and ``data.root``. Full runs (tested too), so that each serves
#: every test that needs a checkpoint of its kind, its run folder or its figures.
TRAINED_RUNS: dict[str, tuple[str, ...]] = {
    # TensorBoard beside the CSV log: its events are tested on this run (test_tensorboard.py)
    "lung": ("trainer.max_epochs=2", "logger=[csv,tensorboard]"),
    "infection": ("task=infection", "trainer.max_epochs=2"),
    "classify": ("task=classify", "trainer.max_epochs=1"),
    # one model that serves both stages of analyze
    "infection_multiclass": (
        "task=infection",
        "data.target=infection_multiclass",
        "loss=dice_ce",
        "trainer.max_epochs=1",
    ),
    # the segmentation head on infection_multiclass, so that it serves both stages too
    "multitask": (
        "task=multitask",
        "data.target=infection_multiclass",
        "loss=dice_ce",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "test=false",
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one thread per core among the workers: torch in each worker, and
    every process a test starts (commands, DDP processes) through OMP_NUM_THREADS and
    MKL_NUM_THREADS, unless the caller set them. Without it each process starts a thread per
    core, and their threads wait on one another: with two workers on two cores the suite took
    14 minutes instead of 5 1/2, a tiny training run several times as long."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // int(workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def shared_folders(tmp_path_factory: pytest.TempPathFactory) -> SharedFolders:
    """Folders built once per session, across xdist workers (see ``shared_folders``)."""
    return SharedFolders(session_base(tmp_path_factory.getbasetemp()) / "shared")


@pytest.fixture(autouse=True)
def _shared_folders_unchanged(shared_folders: SharedFolders) -> Iterator[None]:
    """Fail the test after which a shared folder differs from what its builder left."""
    yield
    changed = shared_folders.changed()
    if changed:
        pytest.fail(
            "a shared read-only folder was changed (by this test, or by one running beside it "
            "in another worker); copy it before changing it:\n" + "\n".join(changed)
        )


@pytest.fixture(scope="session")
def synth_root(shared_folders: SharedFolders) -> Path:
    """A synthetic tree: both subsets, 3 images per split and class, 48 px. Do not modify
    (``synth_copy`` is a copy a test may break)."""

    def build(out: Path) -> None:
        generate(out / "covidqu", per_class=SYNTH_PER_CLASS, size=SYNTH_SIZE, seed=0)

    return shared_folders.get("synth", build) / "covidqu"


@pytest.fixture(scope="session")
def trained_run(shared_folders: SharedFolders, synth_root: Path) -> Callable[[str], Path]:
    """``trained_run(kind)``: the run folder of a tiny model of a kind of ``TRAINED_RUNS``
    trained on ``synth_root``, built once per session. Read-only: a test that resumes or
    changes a run copies it into its own folder first."""

    def get(kind: str) -> Path:
        def build(out: Path) -> None:
            from hydra.core.global_hydra import GlobalHydra

            from covidqu.train.run import train

            from pipeline_helpers import TINY, compose_config

            overrides = [*TINY, f"data.root={synth_root}", *TRAINED_RUNS[kind]]
            train(compose_config("train", overrides, out))
            GlobalHydra.instance().clear()

        return shared_folders.get(f"run-{kind}", build)

    return get


@pytest.fixture(scope="module")
def module_tmp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """``mktemp`` for the runs a module's tests share, removed once they have all passed.

    A tiny run still keeps two checkpoints (last.ckpt about 170 MB with the optimiser state,
    best.ckpt a third of that), so a whole suite's would fill a small disk. Function-level
    folders go the same way through ``tmp_path_retention_policy``; a module with a failure
    keeps its folders for inspection.
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
