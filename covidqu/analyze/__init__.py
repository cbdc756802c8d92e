"""``python -m covidqu.analyze lung_ckpt=LUNG.ckpt infection_ckpt=INF.ckpt input=FILE_OR_DIR``.

The two-stage analysis: lung and infection masks, the infected share of the lung (severity),
its grade and the COVID-19 call for each image, written as masks, overlays and
``analysis.csv``. Without ``input`` it runs on a split of the infection subset
(``data.root=ROOT split=test``) and scores detection, severity and both stages against the
ground truth (``metrics.json`` and plots).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from covidqu.runtime.cli import command


@command("analyze")
def main(cfg: DictConfig) -> dict[str, Any]:
    from covidqu.analyze.run import analyze  # here: --help needs no torch

    return analyze(cfg)
