"""``python -m covidqu.train [overrides]``: train a model; ``-m`` sweeps over overrides.

Examples::

    python -m covidqu.train                                   # synthetic demo, no data needed
    python -m covidqu.train data.root=/data/COVID-QU-Ex task=infection model=fpn encoder=densenet121
    python -m covidqu.train task=multitask module.loss_weights.cls=1.0  # masks + classes
    python -m covidqu.train -m model=unet,fpn encoder=resnet34,densenet121 loss=dice,dice_bce
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import covidqu  # noqa: F401  (registers the config resolvers)
from covidqu.pipeline.cli import reports_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@reports_errors
def main(cfg: DictConfig) -> float | None:
    from covidqu.pipeline.training import train  # here: --help needs no torch

    return train(cfg)


if __name__ == "__main__":
    main()
