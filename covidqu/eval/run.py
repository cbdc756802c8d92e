"""Evaluating a checkpoint on a split: what ``python -m covidqu.eval`` runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from covidqu.eval.calibrate import calibrate, check_calibrate, device_of
from covidqu.eval.checks import USAGE
from covidqu.eval.explain import GradCamWriter
from covidqu.eval.split import SplitAsTest, datamodule_for, fold_settings
from covidqu.models.checkpoint import preprocessing
from covidqu.models.ensemble import EnsembleNet, describe, load_model, temperatures
from covidqu.models.explain import check_explain, check_explain_mode, gradcam_for
from covidqu.models.postprocess import apply_config, post_figures
from covidqu.models.tta import check_tta
from covidqu.runtime import outputs
from covidqu.runtime.checks import refuse_empty_lists, require
from covidqu.runtime.distributed import evaluation_trainer, job_scope
from covidqu.scoring.calibration import plot_reliability

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")
#: The reliability diagram eval draws where the task gives confidences (classification).
RELIABILITY_FILE = "reliability.png"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on ``cfg.split``; write metrics.json, per_image.csv, overlays
    (and with ``explain=gradcam``, a heatmap per image: :mod:`covidqu.eval.explain`).

        On several processes (``trainer=ddp_cpu``) each evaluates its shard of the split; the
        figures and rows are those of one process, written once, by the first.
    """
    refuse_empty_lists(cfg, "ckpt_path")
    require(cfg, ["ckpt_path"], USAGE)
    split = cfg.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"split={split} is not one of {SPLITS}")
    check_tta(cfg.get("tta", "none"))
    check_explain_mode(cfg.get("explain", "none"))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_scope():
        return _evaluate(cfg, split, out_dir)


def _evaluate(cfg: DictConfig, split: str, out_dir: Path) -> dict[str, Any]:
    tta = cfg.get("tta", "none")
    if cfg.get("calibrate"):
        check_calibrate(cfg.ckpt_path)
    module = load_model(cfg.ckpt_path)
    apply_config(module, OmegaConf.to_container(cfg.postprocess) if "postprocess" in cfg else None)
    pre = preprocessing(module)
    explain = cfg.get("explain", "none")
    check_explain(explain, cfg.ckpt_path, type(module), module.recipe.get("task", {}).get("name"))
    gradcam = gradcam_for(module, explain, pre)  # refused here, before the split is read
    members = module.net.members if isinstance(module.net, EnsembleNet) else [module]
    folds = fold_settings([preprocessing(m) for m in members], split)
    datamodule = datamodule_for(
        pre,
        cfg.data.get("root"),
        folds=folds,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        limit_per_class=cfg.data.get("limit_per_class"),
        on_bad_file=cfg.data.get("on_bad_file", "error"),
        cache=cfg.data.get("cache", "none"),
        cache_dir=cfg.data.get("cache_dir"),
        normalise=cfg.data.get("normalise", "auto"),
    )
    if folds.get("num_folds") is not None:
        log.info(
            "the checkpoint validated on fold %s of %s of Train + Val: split=val is that fold, "
            "split=train the others",
            folds.get("fold"),
            folds["num_folds"],
        )
    fitted: dict[str, Any] = {}
    if cfg.get("calibrate"):
        fitted = calibrate(module, datamodule, cfg.ckpt_path, device_of(cfg.trainer))
        if split == "val":
            log.warning("calibrate=true split=val: the temperature was fitted on the split scored")
    module.tta = tta  # every figure, row and overlay of the test step is of the TTA mean
    datamodule.setup({"test": "test", "val": "validate", "train": "fit"}[split])
    module.keep_overlays = int(cfg.get("num_overlays", 0))
    module.keep_worst = int(cfg.get("num_worst", 0))

    callbacks = [GradCamWriter(gradcam, out_dir)] if gradcam is not None else []
    trainer = evaluation_trainer(cfg.trainer, callbacks=callbacks)
    results = trainer.test(module, datamodule=SplitAsTest(datamodule, split), verbose=False)
    figures = outputs.clean_figures(results[0] if results else {})
    metrics: dict[str, Any] = {f"{split}/{k.split('/', 1)[1]}": v for k, v in figures.items()}
    metrics["monitor"] = module.recipe.get("task", {}).get("monitor")
    metrics.update(describe(cfg.ckpt_path))
    metrics["split"] = split
    metrics.update({k: folds[k] for k in ("num_folds", "fold") if k in folds})
    metrics["tta"] = tta
    metrics["explain"] = explain
    metrics["temperature"] = temperatures(module)
    metrics.update(fitted)
    if hasattr(module, "postprocess"):  # the figures of the masks as post-processed, beside
        covid = "infection" if "infection" in module.class_names else None
        metrics.update(post_figures(split, module.test_records, covid))
        metrics["postprocess"] = module.postprocess.describe()
    metrics["images"] = len(module.test_records)
    metrics["world_size"] = int(trainer.world_size)
    metrics.update(outputs.skipped_files(datamodule, out_dir))  # data.on_bad_file=skip
    outputs.write_metrics(out_dir, metrics)
    outputs.write_test_outputs(module, out_dir)
    reliability = module.test_reliability()
    if reliability is not None and trainer.is_global_zero:
        plot_reliability(
            *reliability, out_dir / RELIABILITY_FILE, title=f"{split} split, tta={tta}"
        )
    if trainer.is_global_zero:
        for line in outputs.headline(metrics):  # the figures first, then where they all are
            log.info("%s", line)
        log.info(
            "evaluated %d %s images (tta=%s); outputs in %s",
            len(module.test_records),
            split,
            tta,
            out_dir,
        )
    return metrics
