"""``experiments/perf_table.py``: the speed table of ``experiments/gpu_check.sh``, made from
the figures the data-wait meter writes into each run's CSV log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from covidqu.runtime.data_wait import DATA_WAIT, SAMPLES_PER_S

from pipeline_helpers import PROJECT_ROOT, read_csv

SCRIPT = PROJECT_ROOT / "experiments" / "perf_table.py"


def perf_table(*runs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )


def last_epoch(run) -> dict[str, str]:
    """The CSV row of the run's second and last epoch: the one the table reads (the first,
    with its warm-up, is left out)."""
    rows = [r for r in read_csv(run / "csv" / "metrics.csv") if r.get(SAMPLES_PER_S)]
    assert [r["epoch"] for r in rows] == ["0", "1"]
    return rows[1]


def test_the_table_shows_each_run_with_its_logged_figures(trained_run):
    runs = [trained_run("lung"), trained_run("infection")]  # two epochs each
    done = perf_table(*runs)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert f"speed vs {runs[0].name}" in lines[0]
    rows = {cells[0]: cells[1:] for cells in (line.strip("|").split("|") for line in lines[2:])}
    rows = {name.strip(): [c.strip() for c in cells] for name, cells in rows.items()}
    assert list(rows) == [run.name for run in runs]

    base = float(last_epoch(runs[0])[SAMPLES_PER_S])
    for run in runs:
        epochs, samples_s, wait, ratio = rows[run.name]
        logged = last_epoch(run)
        assert epochs == "1 of 2"
        assert float(samples_s) == pytest.approx(float(logged[SAMPLES_PER_S]), abs=0.05)
        assert float(wait.removesuffix(" %")) == pytest.approx(
            100 * float(logged[DATA_WAIT]), abs=0.05
        )
        want = float(logged[SAMPLES_PER_S]) / base
        assert float(ratio.removesuffix("x")) == pytest.approx(want, abs=0.005)
    assert rows[runs[0].name][3] == "1.00x"


def test_a_folder_without_a_csv_log_is_named_with_the_fix(trained_run, tmp_path):
    done = perf_table(trained_run("lung"), tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path / 'csv' / 'metrics.csv'} does not exist" in done.stderr
    assert "logger=csv" in done.stderr
