"""``python -m covidqu.train [overrides]``: train a model; ``-m`` sweeps over overrides.

Examples::

    python -m covidqu.train                                   # synthetic demo, no data needed
    python -m covidqu.train data.root=/data/COVID-QU-Ex task=infection model=fpn encoder=densenet121
    python -m covidqu.train task=multitask module.loss_weights.cls=1.0  # masks + classes
    python -m covidqu.train -m model=unet,fpn encoder=resnet34,densenet121 loss=dice,dice_bce
"""

from __future__ import annotations

from omegaconf import DictConfig

from covidqu.runtime.cli import command


@command("train")
def main(cfg: DictConfig) -> float | None:
    from covidqu.train.run import train  # here: --help needs no torch

    return train(cfg)
