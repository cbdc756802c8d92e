"""Learning checks on synthetic data: figures that a broken pipeline cannot reach.

Stated figures: the default command (``python -m covidqu.train`` with no dataset) reaches lung
``val/dice >= 0.9`` (it reaches about 0.95 in under a minute on 2 CPU cores); a ResNet-18
classifier trained for 15 short epochs reaches ``val/acc >= 0.6`` on the three balanced classes
(chance: 0.33; it reaches about 0.7).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from covidqu.data.synth import ensure_synthetic
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config, read_metrics, run_module


@pytest.fixture(scope="module")
def demo_home(module_tmp: Callable[[str], Path]) -> Path:
    """A stand-in project root and cache, shared by the checks of this file."""
    return module_tmp("demo")


def test_default_command_learns_lung_segmentation(demo_home: Path):
    proc = run_module(
        "covidqu.train",
        [],  # exactly what the README runs
        env={"PROJECT_ROOT": str(demo_home), "COVIDQU_CACHE": str(demo_home / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "No dataset configured" in said
    # the one warning is that one: none from a library, about settings the demo chose
    assert not re.search(r"\.py:\d+: ", said), said[-3000:]  # a Python warning names its line
    assert "WARNING" not in said.replace("][WARNING] - No dataset configured", "")
    assert "Trainer already configured" not in said
    runs = sorted((demo_home / "logs" / "lung" / "runs").iterdir())
    assert len(runs) == 1
    metrics = read_metrics(runs[0])
    assert metrics["monitor"] == "val/dice"
    assert metrics["val/dice"] >= 0.9, metrics
    assert metrics["test/dice"] >= 0.85, metrics
    assert (runs[0] / "checkpoints" / "best.ckpt").is_file()
    # the synthetic sample was generated once, into the cache
    assert len([p for p in (demo_home / "cache").iterdir() if not p.name.startswith(".")]) == 1


@pytest.mark.slow  # 15 epochs (about 40 s); the README's own command above stays in the quick loop
def test_classification_learns_above_chance(demo_home: Path, tmp_path: Path):
    root = ensure_synthetic(demo_home / "cache", per_class=40, size=128)
    overrides = [o for o in TINY if not o.startswith("data.image_size")]
    cfg = compose_config(
        "train",
        [
            *overrides,
            "task=classify",
            f"data.root={root}",
            "data.image_size=64",
            "data.batch_size=16",
            "trainer.max_epochs=15",
            # validated every 5th epoch and never tested: the checks read val figures only
            "trainer.check_val_every_n_epoch=5",
            "test=false",
        ],
        tmp_path,
    )
    train(cfg)
    metrics = read_metrics(tmp_path)
    assert metrics["val/acc"] >= 0.6, metrics
    assert metrics["val/auroc"] >= 0.7, metrics
