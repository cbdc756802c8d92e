"""``python -m covidqu.export ckpt_path=PATH format=onnx|torchscript output=FILE``.

Writes the checkpoint's network as an ONNX or TorchScript file that takes the normalised image
(``B x 1 x H x W`` at the checkpoint's image size, any batch size) and returns logits, with the
preprocessing and class names inside the file as metadata (see :mod:`covidqu.export.run`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from covidqu.runtime.cli import command


@command("export")
def main(cfg: DictConfig) -> None:
    from covidqu.export.run import run  # here: --help needs no torch

    run(cfg)
