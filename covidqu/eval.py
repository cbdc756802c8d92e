"""``python -m covidqu.eval ckpt_path=PATH [split=test] [num_overlays=16] [data.root=...]``.

Evaluates a checkpoint on a split of the dataset it was trained for, with the preprocessing
stored in the checkpoint, and writes ``metrics.json``, ``per_image.csv`` and overlay PNGs into
its own run folder.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

import covidqu  # noqa: F401  (registers the config resolvers)
from covidqu.pipeline.cli import reports_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@reports_errors
def main(cfg: DictConfig) -> dict[str, Any]:
    from covidqu.pipeline.evaluation import evaluate  # here: --help needs no torch

    return evaluate(cfg)


if __name__ == "__main__":
    main()
