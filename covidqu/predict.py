"""``python -m covidqu.predict ckpt_path=PATH input=FILE_OR_DIR output=DIR``.

Writes a mask (at the input's own size) and an overlay per image, and ``predictions.csv``.
Unreadable files are reported and skipped; the others are still written. Images stream through
``num_workers`` loader processes in batches of ``batch_size`` (memory does not grow with the
number of files), with a progress bar on a terminal (``progress_bar=false``: none).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import covidqu  # noqa: F401  (registers the config resolvers)
from covidqu.errors import ConfigError
from covidqu.pipeline.cli import reports_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@reports_errors
def main(cfg: DictConfig) -> None:
    from covidqu.pipeline.prediction import predict  # here: --help needs no torch

    for key in ("ckpt_path", "input", "output"):
        if not cfg.get(key):
            raise ConfigError(
                f"{key} is required: python -m covidqu.predict ckpt_path=RUN/checkpoints/best.ckpt "
                "input=IMAGE_OR_FOLDER output=OUT_FOLDER"
            )
    predict(
        cfg.ckpt_path,
        cfg.input,
        cfg.output,
        batch_size=cfg.batch_size,
        device=cfg.device,
        recursive=cfg.recursive,
        num_workers=cfg.num_workers,
        progress_bar=cfg.progress_bar,
        tta=cfg.get("tta", "none"),
    )


if __name__ == "__main__":
    main()
