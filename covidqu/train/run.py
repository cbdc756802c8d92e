"""Training from a composed config: what ``python -m covidqu.train`` runs.

:func:`train` builds the DataModule, network, loss, metrics and LightningModule from the config
(everything through ``hydra.utils.instantiate``), fits, validates and tests the best checkpoint,
and writes ``metrics.json`` into the run folder. It returns the monitored value, so Hydra's
sweepers can optimise it. Every checkpoint it reads (the one it resumes from, the best one it
scores) Lightning reads with ``weights_only=True``: a file that would unpickle other Python
objects is refused with a :class:`~covidqu.errors.CheckpointError`, its code never run.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covidqu.constants import CLASSES
from covidqu.data.layout import DataError
from covidqu.errors import RunInterrupted, UserError
from covidqu.files import describe_files, disk_full, remove_stale_temporaries
from covidqu.models.checkpoint import RESAVE_CHECKPOINT, refusing_unsafe
from covidqu.models.postprocess import post_figures
from covidqu.runtime import outputs, runlock
from covidqu.runtime.callbacks import EMA
from covidqu.runtime.config import print_config
from covidqu.runtime.distributed import job_scope, use_job_command_for_ddp
from covidqu.runtime.interrupts import StopOnSignal, interrupted
from covidqu.runtime.loggers import CSVResume, finish_loggers, log_config, log_final
from covidqu.runtime.tensorboard_logger import TensorBoardResume
from covidqu.train.checks import check, check_resume
from covidqu.train.postprocess import prepare_choice, recorded_steps, settle_choice
from covidqu.train.synthetic import apply_synthetic_defaults
from covidqu.train.tune import find_lr

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group dict that has a ``_target_`` (null entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def make_recipe(
    cfg: DictConfig, datamodule: Any, transfer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the network and its preprocessing on its own, and
    what its network was initialised from (``transfer``: what a covidqu checkpoint gave it)."""
    module_kwargs = OmegaConf.to_container(cfg.module, resolve=True)
    module_kwargs = {k: v for k, v in module_kwargs.items() if k not in ("_target_", "metrics")}
    data = OmegaConf.to_container(cfg.data, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    # What the number of optimizer steps of a run follows, by the key a user sets: a resumed
    # run's step-counted schedule is rebuilt or refused when its length changed, naming them
    # (covidqu.models.schedulers.plan_steps).
    steps_from = {
        "trainer.max_epochs": trainer.get("max_epochs"),
        "data.batch_size": data.get("batch_size"),
        "trainer.devices": trainer.get("devices"),
        "trainer.num_nodes": trainer.get("num_nodes"),
        "trainer.accumulate_grad_batches": trainer.get("accumulate_grad_batches"),
        "trainer.limit_train_batches": trainer.get("limit_train_batches"),
    }
    return {
        "net": OmegaConf.to_container(cfg.model, resolve=True),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "metrics": OmegaConf.to_container(cfg.module.metrics, resolve=True),
        "module_kwargs": module_kwargs,
        "task": {
            "name": cfg.task.name,
            "kind": cfg.task.kind,
            "monitor": cfg.task.monitor,
            "monitor_mode": cfg.task.monitor_mode,
        },
        "classes": list(CLASSES),
        "preprocess": {
            "datamodule": cfg.data._target_,
            "subset": datamodule.subset,
            "target": datamodule.target,
            "image_size": data["image_size"],
            "mean": datamodule.mean,
            "std": datamodule.std,
            "in_channels": 1,
            "data_root": str(cfg.data.root),
            # the split validated on: a resume into another fold is refused (train.checks)
            "num_folds": getattr(datamodule, "num_folds", None),
            "fold": getattr(datamodule, "fold", None),
            "fold_seed": getattr(datamodule, "fold_seed", None),
            "duplicate_distance": getattr(datamodule, "duplicate_distance", None),
        },
        "schedule": {"settings": steps_from},
        # the masks' post-processing; postprocess=auto writes its choice in once it is made
        "postprocess": recorded_steps(cfg),
        # whether state_dict holds an exponential moving average of the weights, and its decay
        "ema": ema_settings(cfg),
        "init": {
            "encoder.weights": _plain_weights(cfg.encoder.get("weights")),
            "encoder.load_decoder": bool(cfg.encoder.get("load_decoder", False)),
            "from_checkpoint": transfer,
        },
    }


def ema_settings(cfg: DictConfig) -> dict[str, Any]:
    """``{"enabled": ..., "decay": ...}`` of ``ema`` / ``ema_decay`` (decay null when off)."""
    enabled = bool(cfg.get("ema", False))
    return {"enabled": enabled, "decay": float(cfg.ema_decay) if enabled else None}


def _plain_weights(weights: Any) -> Any:
    return weights if weights is None or isinstance(weights, bool | str) else str(weights)


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The DataModule and LightningModule a config describes."""
    # On use: it imports smp and timm (and timm imports wandb), a second of start-up.
    from covidqu.models.networks import check_input_size

    # plain dicts and lists in its hyper-parameters (data.limit_per_class={train: N, ...}):
    # checkpoints must load with weights_only=True
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(cfg.model)
    check_input_size(net, datamodule.image_size)
    transfer = None
    if cfg.encoder.get("load_decoder"):
        from covidqu.models.transfer import load_decoder

        model = OmegaConf.to_container(cfg.model, resolve=True)
        loaded = load_decoder(net, cfg.encoder.weights, datamodule.target, model)
        log.info("%s", loaded.describe())
        transfer = loaded.record()
    loss = instantiate(cfg.loss)
    metrics = instantiate(cfg.module.metrics)
    module = instantiate(
        cfg.module,
        net=net,
        loss=loss,
        metrics=metrics,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler.scheduler) if cfg.scheduler.scheduler else None,
        scheduler_interval=cfg.scheduler.interval,
        scheduler_monitor=cfg.scheduler.monitor,
        recipe=make_recipe(cfg, datamodule, transfer),
        _recursive_=False,
        _convert_="all",  # plain lists and dicts: checkpoints then load with weights_only
    )
    return datamodule, module


def _has_split(datamodule: Any, split: str) -> bool:
    try:
        datamodule.split_samples(split)
    except DataError:  # an empty or missing split: reported by the caller
        return False
    return True


def train(cfg: DictConfig) -> float | None:
    """Fit, then validate and test the best checkpoint; write ``metrics.json``.

    Returns the value of ``task.monitor`` for the best checkpoint (``None`` when it was not
    logged, e.g. in a ``fast_dev_run``). A failure writes ``failure.txt`` beside whatever
    checkpoints and logs the run left. In a sweep the failed job returns the worst possible
    value (-inf when maximising, +inf when minimising) so that the other jobs go on, and an
    Optuna search records a failed trial; the sweep's summary then reports the failure and exits
    non-zero. Outside a sweep the error is raised. SIGTERM or Ctrl-C raises
    :class:`~covidqu.errors.RunInterrupted` (in a sweep too: the whole sweep stops), after
    saving the state of that moment as ``checkpoints/last.ckpt`` when training was under way.
    """
    out_dir = Path(cfg.paths.output_dir)
    started = time.time()
    try:  # cheap checks first; a refused run writes nothing, not even into its folder
        apply_synthetic_defaults(cfg)
        check(cfg, out_dir)
    except UserError as err:
        # Hydra has made the job's folder already: say there why it stopped (unless another
        # live run is writing there: not even failure.txt then; this duplicate sweep stops)
        if in_sweep() and not isinstance(err, runlock.FolderInUse):
            out_dir.mkdir(parents=True, exist_ok=True)
            outputs.write_failure(out_dir, err, "", time.time() - started)
            log.error("this job was refused (%s); the sweep goes on", err)
            return _worst(cfg)
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = runlock.take(out_dir)  # one writer per run folder: refused while another runs here
    outputs.clear_failure(out_dir)  # an earlier attempt's note: this attempt decides anew
    try:
        with job_scope():
            return _train(cfg, out_dir, started)
    except RunInterrupted as err:
        outputs.write_failure(out_dir, err, "", time.time() - started)
        raise
    except Exception as err:
        full = disk_full(err)
        if full is not None:  # one line that says what to do, and what the run still has
            kept = describe_files(out_dir / "checkpoints")
            err = full.keeping(
                f" The run's checkpoints are intact: {kept}; once there is room, the same "
                "command resumes from the newest of them that loads."
            )
        outputs.write_failure(out_dir, err, traceback.format_exc(), time.time() - started)
        if full is not None and not in_sweep():
            raise err from None
        if in_sweep():
            log.error(
                "this job failed (%s: %s); the sweep goes on. Details: %s",
                type(err).__name__,
                err,
                out_dir / outputs.FAILURE_FILE,
            )
            return _worst(cfg)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside training (setup, final test): no traceback
        stop = interrupted("SIGINT", out_dir)
        outputs.write_failure(out_dir, stop, "", time.time() - started)
        raise stop from None
    except BaseException as err:  # interrupted: record it, then stop as asked
        outputs.write_failure(out_dir, err, traceback.format_exc(), time.time() - started)
        raise
    finally:
        lock.release()


def _worst(cfg: DictConfig) -> float:
    return float("-inf") if cfg.task.get("monitor_mode") == "max" else float("inf")


def in_sweep() -> bool:
    """Whether this job is one of a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not running under @hydra.main
        return False


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """``ckpt_path`` if given; else, when ``auto_resume``, the run folder's newest checkpoint
    that loads (``last.ckpt`` as a rule); either only when it was written by this config
    (:func:`~covidqu.train.checks.check_resume`).

    A job requeued by Slurm after preemption or a timeout starts again in the same folder:
    it continues from its last checkpoint instead of from scratch. Temporary files that a
    writer killed mid-write left in ``checkpoints/`` are removed first.
    """
    remove_stale_temporaries(out_dir / "checkpoints")
    found = check_resume(cfg, out_dir)
    if found is None:
        return None
    if found.why == "auto_resume":
        log.warning("%s (auto_resume=true; set auto_resume=false to restart)", found.describe())
    return str(found.path)


def _train(cfg: DictConfig, out_dir: Path, started: float) -> float | None:
    print_config(cfg, outputs.save_config(cfg, out_dir))  # one line; print_config=true: all
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    use_job_command_for_ddp()

    datamodule, module = build(cfg)
    # Not in the callbacks group: stopping cleanly and resuming without duplicated log rows
    # are what train() promises, whichever callbacks a config lists.
    stopper = StopOnSignal(out_dir / "checkpoints" / "last.ckpt")
    callbacks = [*instantiate_all(cfg.get("callbacks")), stopper, CSVResume(), TensorBoardResume()]
    if cfg.get("ema", False):  # a switch and a decay a user types, not a callbacks entry
        callbacks.append(EMA(decay=cfg.ema_decay))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resume = resume_path(cfg, out_dir)
    fix = RESAVE_CHECKPOINT
    if resume and not cfg.get("ckpt_path"):
        fix += " Or set auto_resume=false to train afresh instead of resuming from it."
    try:
        found = find_lr(cfg, trainer, module, datamodule, out_dir, resume)  # tune=lr, else None
        if found is not None and found.stop:  # tune.apply=false: the suggestion is the result
            return None
        log_config(loggers, cfg)  # after the finder: with the learning rate it set
        try:
            # Lightning reads the checkpoint it resumes from with torch.load(weights_only=True)
            # when asked: a file that would unpickle other objects is refused, never run.
            with refusing_unsafe("ckpt_path", resume, fix):
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        except (KeyboardInterrupt, SystemExit):  # SIGTERMException; a Ctrl-C ends in exit(1)
            stop = stopper.interruption(out_dir)
            if stop is None:
                raise
            raise stop from None
        stop = stopper.interruption(out_dir)
        if stop is not None:  # a signal as training ended: stop as asked, before testing
            raise stop
        metrics = _final_metrics(cfg, trainer, module, datamodule, out_dir)
        metrics.update(outputs.skipped_files(datamodule, out_dir))  # data.on_bad_file=skip
        if found is not None:
            metrics["tuned_lr"] = found.lr
        log_final(loggers, cfg, metrics, trainer.global_step)  # TensorBoard's HPARAMS view
    finally:
        finish_loggers(loggers)
    metrics["duration_s"] = round(time.time() - started, 1)
    outputs.write_metrics(out_dir, metrics)
    value = metrics.get(cfg.task.monitor)
    log.info("%s = %s (metrics.json in %s)", cfg.task.monitor, value, out_dir)
    return value


def _final_metrics(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: Any,
    out_dir: Path,
) -> dict[str, Any]:
    """Validate (and test) the best checkpoint; the figures for ``metrics.json``."""
    best = _best_checkpoint(trainer)
    if best is None and not trainer.fast_dev_run:
        log.warning("no best checkpoint was recorded; final figures use the last weights")
    figures: dict[str, Any] = {}
    prepare_choice(cfg, module)  # postprocess=auto: every combination scored on Val
    figures.update(_score_best(trainer.validate, module, datamodule, best))
    chosen = settle_choice(cfg, module, best, out_dir, trainer.is_global_zero)
    if cfg.get("test", True):
        if _has_split(datamodule, "test"):
            module.keep_worst = int(cfg.get("num_worst", 0))  # their overlays, for report.html
            figures.update(_score_best(trainer.test, module, datamodule, best))
            if hasattr(module, "postprocess"):  # the test images' masks as post-processed
                covid = "infection" if "infection" in module.class_names else None
                figures.update(post_figures("test", module.test_records, covid))
            outputs.write_test_outputs(module, out_dir)
        else:
            log.warning("no test split under %s: test figures are skipped", cfg.data.root)
    metrics: dict[str, Any] = outputs.clean_figures(figures)
    metrics.update(chosen)
    metrics["monitor"] = cfg.task.monitor
    metrics["epochs"] = int(trainer.current_epoch)
    metrics["world_size"] = int(trainer.world_size)
    # which re-split of Train + Val it validated on (null: the official splits); report groups
    # the folds of one setting by these
    metrics["num_folds"] = getattr(datamodule, "num_folds", None)
    metrics["fold"] = getattr(datamodule, "fold", None)
    metrics["ema_decay"] = ema_settings(cfg)["decay"]  # null: the weights are not averaged
    metrics["best_checkpoint"] = outputs.relative(best, out_dir) if best is not None else None
    return metrics


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The file of the best weights by a monitored metric; ``None`` when nothing picked one.

    ``trainer.checkpoint_callback`` is merely the first ModelCheckpoint: without the ``best``
    one (``callbacks.model_checkpoint=null``) it is the one writing ``last.ckpt``, whose
    ``best_model_path`` is the latest file, not the best.
    """
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "best_model_path", None)
        if getattr(callback, "monitor", None) is not None and path:
            return path
    return None


def _score_best(
    stage: Callable[..., list[Any]], module: pl.LightningModule, datamodule: Any, best: str | None
) -> dict[str, float]:
    """``trainer.validate`` or ``trainer.test`` (``stage``) of the best checkpoint, which
    Lightning reads with ``weights_only=True`` like every checkpoint."""
    with refusing_unsafe("ckpt_path", best):
        return _first(stage(module, datamodule=datamodule, ckpt_path=best, weights_only=True))


def _first(results: list[dict[str, float]]) -> dict[str, float]:
    return dict(results[0]) if results else {}
