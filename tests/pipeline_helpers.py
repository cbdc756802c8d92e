"""Composing the real configs as users run them, for tests of the entry points."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import covidqu  # noqa: F401  (registers the config resolvers)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF = PROJECT_ROOT / "conf"

#: Overrides that keep a test run tiny and quiet on the CPU.
TINY = [
    "encoder=resnet18",
    "encoder.weights=null",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
]

#: A few batches of a 32 px model: enough for a checkpoint with trained batch-norm statistics.
QUICK = [
    *TINY,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "test=false",
    "logger=csv",
]


def compose_config(name: str, overrides: list[str], out_dir: Path) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with ``overrides``, as ``@hydra.main`` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=name,
            return_hydra_config=True,
            overrides=[*overrides, f"paths.output_dir={out_dir}"],
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_module(
    module: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a fresh process, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if k != "COVIDQU_ROOT"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=PROJECT_ROOT,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())
