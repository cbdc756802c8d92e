"""``python -m covidqu.eval ckpt_path=PATH [split=test] [num_overlays=16] [data.root=...]``.

Evaluates a checkpoint on a split of the dataset it was trained for, with the preprocessing
stored in the checkpoint, and writes ``metrics.json``, ``per_image.csv`` and overlay PNGs into
its own run folder.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from covidqu.runtime.cli import command


@command("eval")
def main(cfg: DictConfig) -> dict[str, Any]:
    from covidqu.eval.run import evaluate  # here: --help needs no torch

    return evaluate(cfg)
