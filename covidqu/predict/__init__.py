"""``python -m covidqu.predict ckpt_path=PATH input=FILE_OR_DIR output=DIR``.

Writes a mask (at the input's own size) and an overlay per image, and ``predictions.csv``.
Unreadable files are reported and skipped; the others are still written. Images stream through
``num_workers`` loader processes in batches of ``batch_size`` (memory does not grow with the
number of files), with a progress bar on a terminal (``progress_bar=false``: none).
"""

from __future__ import annotations

from omegaconf import DictConfig

from covidqu.runtime.cli import command


@command("predict")
def main(cfg: DictConfig) -> None:
    from covidqu.predict.run import run  # here: --help needs no torch

    run(cfg)
