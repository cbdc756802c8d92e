"""Start-up: the commands import their heavy optional libraries only when they use them.

``--help`` and ``inspect`` answer without torch; the library modules behind the commands load
torch and Lightning but not wandb, optuna, submitit, timm, albumentations or smp, which the code
that uses them imports on use. What a process imported is read from ``python -X importtime``
(every module it imported, once): no timing, only names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import PROJECT_ROOT

#: Loaded only by the code that uses them (W&B logging, sweeps, Slurm, the networks, the
#: augmentation pipelines).
HEAVY = ("wandb", "optuna", "submitit", "timm", "albumentations", "segmentation_models_pytorch")


def imported(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS``; the process and the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if k != "COVIDQU_ROOT"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=PROJECT_ROOT,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and not line.endswith("imported package"):
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return proc, names


@pytest.mark.parametrize("command", ["train", "eval", "predict", "analyze", "report", "export"])
def test_help_imports_neither_torch_nor_heavy_libraries(command: str):
    proc, names = imported(["-m", f"covidqu.{command}", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert command in proc.stdout  # the help itself: "train is powered by Hydra", "usage: ..."
    unwanted = {*HEAVY, "torch", "pytorch_lightning"}
    assert not names & unwanted, sorted(names & unwanted)


def test_inspect_imports_no_torch(synth_root: Path):
    proc, names = imported(["-m", "covidqu.data", "inspect", str(synth_root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "infection" in proc.stdout.lower()  # the counts were printed
    assert not names & {*HEAVY, "torch"}, sorted(names & {*HEAVY, "torch"})


def test_library_modules_import_heavy_libraries_only_on_use():
    modules = [
        "covidqu.train.run",
        "covidqu.eval.run",
        "covidqu.predict.run",
        "covidqu.export.run",
        "covidqu.analyze.run",
        "covidqu.runtime.checks",
        "covidqu.runtime.inputs",
        *(f"covidqu.{command}.checks" for command in ("train", "eval", "predict", "analyze")),
        "covidqu.export.checks",
        "covidqu.scoring.plots",
        "covidqu.scoring.calibration",
        "covidqu.data.datasets",
        "covidqu.data.transforms",
    ]
    proc, names = imported(["-c", f"import {', '.join(modules)}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" in names  # the probe sees imports at all
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
