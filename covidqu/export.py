"""``python -m covidqu.export ckpt_path=PATH format=onnx|torchscript output=FILE``.

Writes the checkpoint's network as an ONNX or TorchScript file that takes the normalised image
(``B x 1 x H x W`` at the checkpoint's image size, any batch size) and returns logits, with the
preprocessing and class names inside the file as metadata (see :mod:`covidqu.pipeline.export`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import covidqu  # noqa: F401  (registers the config resolvers)
from covidqu.pipeline.cli import reports_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@reports_errors
def main(cfg: DictConfig) -> None:
    from covidqu.pipeline.export import check_required, export  # here: --help needs no torch

    check_required(cfg)
    export(cfg.ckpt_path, cfg.output, cfg.format)


if __name__ == "__main__":
    main()
