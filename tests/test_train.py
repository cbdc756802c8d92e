"""Training through the real configs and entry point: every task, resume, failures, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from covidqu.errors import ConfigError
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics, run_module


def tiny(root: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", *extra]


@pytest.mark.parametrize(
    ("task", "extra", "expected"),
    [
        (
            "lung",
            [],
            [
                "val/dice",
                "val/iou",
                "test/dice",
                "test/specificity",
                "test/precision",
                "val/dice_image",
            ],
        ),
        (
            "infection",
            ["model=fpn"],
            ["val/dice", "test/sensitivity", "val/dice_image", "test/dice_covid", "test/iou_covid"],
        ),
        (
            "infection",
            ["data.target=infection_multiclass", "loss=dice_ce"],
            ["val/dice", "val/dice_infection", "val/dice_lung", "val/dice_covid", "val/iou_image"],
        ),
        ("classify", [], ["val/acc", "val/f1_macro", "val/auroc", "test/sensitivity_covid"]),
    ],
)
def test_fast_dev_run_of_each_task(synth_root, tmp_path, task, extra, expected):
    cfg = compose_config("train", tiny(synth_root, f"task={task}", "debug=fdr", *extra), tmp_path)
    train(cfg)
    metrics = read_metrics(tmp_path)
    for key in expected:
        assert key in metrics, (key, sorted(metrics))
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["monitor"] == cfg.task.monitor
    assert (tmp_path / "config.yaml").is_file()
    per_image = read_csv(tmp_path / "per_image.csv")
    assert len(per_image) == 4  # one test batch in a fast_dev_run
    assert {"id", "class"} <= set(per_image[0])


def test_classify_on_the_infection_subset_with_a_timm_model(synth_root, tmp_path):
    cfg = compose_config(
        "train",
        tiny(
            synth_root, "task=classify", "data=infection", "model.name=convnext_atto", "debug=fdr"
        ),
        tmp_path,
    )
    assert cfg.data._target_.endswith("InfectionDataModule")
    train(cfg)
    assert "test/acc" in read_metrics(tmp_path)
    assert (tmp_path / "confusion_matrix.csv").is_file()


def test_short_run_writes_checkpoints_metrics_and_logs(synth_root, tmp_path):
    cfg = compose_config("train", tiny(synth_root, "trainer.max_epochs=2"), tmp_path)
    value = train(cfg)
    metrics = read_metrics(tmp_path)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert metrics["monitor"] == "val/dice" and value == pytest.approx(metrics["val/dice"])
    assert metrics["epochs"] == 2
    assert metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    for stage in ("val", "test"):
        for name in ("dice", "iou", "sensitivity", "specificity", "precision", "loss"):
            assert f"{stage}/{name}" in metrics
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    recipe = ckpt["covidqu"]
    assert recipe["preprocess"]["image_size"] == 32
    assert recipe["net"]["arch"] == "unet"


def test_without_a_best_checkpoint_the_last_weights_are_reported(synth_root, tmp_path, caplog):
    """callbacks.model_checkpoint=null leaves only last.ckpt: it is not the best checkpoint."""
    cfg = compose_config(
        "train",
        tiny(synth_root, "trainer.max_epochs=2", "callbacks.model_checkpoint=null"),
        tmp_path,
    )
    with caplog.at_level("WARNING", logger="covidqu"):
        train(cfg)
    metrics = read_metrics(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert "best_checkpoint" in metrics and metrics["best_checkpoint"] is None
    assert "no best checkpoint" in caplog.text and "last weights" in caplog.text
    # the final figures are those of the last epoch's weights
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    last_val = [float(r["val/dice"]) for r in rows if r.get("val/dice") and r["epoch"] == "1"]
    assert metrics["val/dice"] == pytest.approx(last_val[-1], abs=1e-6)


def _test_figures(ckpt: Path, root: Path) -> dict[str, float]:
    """Test figures of one checkpoint, scored on its own as ``covidqu.eval`` scores it."""
    import pytorch_lightning as pl

    from covidqu.eval.split import datamodule_for
    from covidqu.models.checkpoint import load_module, preprocessing

    module = load_module(ckpt)
    dm = datamodule_for(preprocessing(module), root, batch_size=4, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    return trainer.test(module, datamodule=dm, verbose=False)[0]


def test_final_figures_come_from_the_best_checkpoint_not_the_last_epoch(synth_root, tmp_path):
    """metrics.json reports the checkpoint that won the monitor, even when it is an early one.

    Monitoring the validation loss with mode=max makes the best epoch the first one (the loss
    falls as the network learns), so the best checkpoint and the last weights differ.
    """
    cfg = compose_config(
        "train",
        tiny(
            synth_root,
            "trainer.max_epochs=2",
            "task.monitor=val/loss",
            "task.monitor_mode=max",
            "callbacks.early_stopping=null",
        ),
        tmp_path,
    )
    value = train(cfg)
    metrics = read_metrics(tmp_path)
    assert metrics["monitor"] == "val/loss" and metrics["epochs"] == 2
    # one row per epoch of fit; the final validation logs again, under epoch 2
    per_epoch = {
        int(r["epoch"]): r
        for r in read_csv(tmp_path / "csv" / "metrics.csv")
        if r.get("val/loss") and int(r["epoch"]) < 2
    }
    assert sorted(per_epoch) == [0, 1]
    losses = {e: float(r["val/loss"]) for e, r in per_epoch.items()}
    best_epoch = max(losses, key=losses.get)
    assert best_epoch == 0, losses  # the construction above: the first epoch wins
    assert losses[0] > losses[1] + 1e-4, losses

    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["epoch"] == best_epoch
    # every validation figure is the winning epoch's, not the last epoch's
    for key in ("val/loss", "val/dice", "val/iou", "val/sensitivity"):
        assert metrics[key] == pytest.approx(float(per_epoch[best_epoch][key]), abs=1e-5), key
    assert metrics["val/loss"] != pytest.approx(losses[1], abs=1e-5)
    assert value == pytest.approx(losses[best_epoch], abs=1e-5)
    # and the test figures are those of best.ckpt scored on its own
    of_best = _test_figures(tmp_path / "checkpoints" / "best.ckpt", synth_root)
    of_last = _test_figures(tmp_path / "checkpoints" / "last.ckpt", synth_root)
    assert of_best["test/dice"] != pytest.approx(of_last["test/dice"], abs=1e-4)
    for key in ("test/dice", "test/iou", "test/loss"):
        assert metrics[key] == pytest.approx(of_best[key], abs=1e-5), key


def test_resume_continues_the_epoch_counter(synth_root, tmp_path):
    first = tmp_path / "first"
    train(compose_config("train", tiny(synth_root, "trainer.max_epochs=1"), first))
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0

    second = tmp_path / "second"
    cfg = compose_config(
        "train", tiny(synth_root, "trainer.max_epochs=3", f"ckpt_path={last}"), second
    )
    train(cfg)
    assert read_metrics(second)["epochs"] == 3
    rows = read_csv(second / "csv" / "metrics.csv")
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("val/dice")})
    assert epochs[0] == 1  # the resumed run started at epoch 1, not 0
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2
    assert resumed["optimizer_states"] and resumed["lr_schedulers"]


def test_local_encoder_weights_file(synth_root, tmp_path):
    import segmentation_models_pytorch as smp

    encoder = smp.Unet("resnet18", encoder_weights=None, in_channels=3).encoder
    weights = tmp_path / "resnet18 encoder.pth"
    torch.save(encoder.state_dict(), weights)
    cfg = compose_config(
        "train", tiny(synth_root, "debug=fdr", f"encoder.weights='{weights}'"), tmp_path / "run"
    )
    train(cfg)
    assert "val/dice" in read_metrics(tmp_path / "run")


def test_a_failed_run_leaves_a_failure_note(synth_root, tmp_path):
    # a value no up-front check knows of: the optimizer itself refuses it once training starts
    cfg = compose_config(
        "train", tiny(synth_root, "trainer.max_epochs=1", "+optimizer.betas=[1.5,0.999]"), tmp_path
    )
    with pytest.raises(ValueError):
        train(cfg)
    note = (tmp_path / "failure.txt").read_text()
    assert "status: failed" in note and "beta" in note.lower()
    assert (tmp_path / "config.yaml").is_file()


def test_config_mismatch_is_refused_before_building(synth_root, tmp_path):
    cfg = compose_config("train", tiny(synth_root, "task=classify", "model=unet"), tmp_path)
    with pytest.raises(ConfigError, match="task=classify needs a classifier"):
        train(cfg)


def test_the_entry_point_runs_a_sweep_member_and_returns(synth_root, tmp_path):
    proc = run_module(
        "covidqu.train",
        [*tiny(synth_root, "debug=fdr"), f"hydra.run.dir={tmp_path}"],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/dice" in read_metrics(tmp_path)
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")),
)
def test_every_experiment_composes_and_passes_the_checks(name, tmp_path, trained_run):
    from covidqu.train.checks import check_config, check_transfer

    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    if cfg.encoder.load_decoder:  # a recipe that starts from a lung run refuses to start without
        with pytest.raises(ConfigError, match=r"encoder\.weights=RUN/checkpoints/best\.ckpt"):
            check_transfer(cfg)
        lung = trained_run("lung") / "checkpoints" / "best.ckpt"  # U-Net / ResNet-18 as theirs
        cfg = compose_config("train", [f"experiment={name}", f"encoder.weights={lung}"], tmp_path)
    check_config(cfg)
    check_transfer(cfg)  # and its decoder fits the recipe's
    assert cfg.task.monitor.startswith("val/")


@pytest.mark.parametrize("task", ["lung", "infection", "multitask"])
def test_the_cpu_recipes_train_on_two_cores_with_every_method_on(task, tmp_path):
    cfg = compose_config("train", [f"experiment=cpu_{task}"], tmp_path)
    assert cfg.task.name == task and cfg.trainer.accelerator == "cpu"
    assert cfg.encoder.weights is None  # nothing to download
    assert cfg.ema and cfg.postprocess.mode == "auto" and cfg.data.cache == "packed"
    assert cfg.encoder.load_decoder == (task != "lung")  # transfer from the lung model


@pytest.mark.parametrize("task", ["lung", "infection", "classify"])
def test_the_paper_recipes_are_the_papers_setting_on_a_gpu(task, tmp_path):
    cfg = compose_config("train", [f"experiment=paper_{task}"], tmp_path)
    assert cfg.task.name == task and cfg.data.image_size == 256
    assert cfg.encoder.name == "densenet121" and cfg.encoder.weights == "imagenet"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    arch = {"lung": "unetplusplus", "infection": "fpn"}.get(task)
    assert arch is None or cfg.model.arch == arch


@pytest.mark.parametrize(
    "extra",
    [
        ["scheduler=plateau", "optimizer=sgd"],
        ["scheduler=onecycle", "optimizer=adam"],
        ["scheduler=none", "trainer.precision=bf16-mixed"],
        [
            "trainer.gradient_clip_val=1.0",
            "trainer.accumulate_grad_batches=2",
            "seed=7",
            "trainer.deterministic=true",
        ],
    ],
    ids=["plateau-sgd", "onecycle-adam", "bf16", "clip-accumulate-deterministic"],
)
def test_optimisation_options(synth_root, tmp_path, extra):
    cfg = compose_config("train", tiny(synth_root, "trainer.max_epochs=2", *extra), tmp_path)
    train(cfg)
    metrics = read_metrics(tmp_path)
    assert metrics["epochs"] == 2 and 0.0 <= metrics["val/dice"] <= 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    if "scheduler=none" in extra:
        assert ckpt["lr_schedulers"] == []
    else:
        assert len(ckpt["lr_schedulers"]) == 1


def test_a_requeued_job_resumes_from_its_own_last_checkpoint(synth_root, tmp_path):
    """A Slurm job requeued after preemption starts again in the same folder."""
    train(compose_config("train", tiny(synth_root, "trainer.max_epochs=1"), tmp_path))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    train(compose_config("train", tiny(synth_root, "trainer.max_epochs=2"), tmp_path))
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    # the log keeps the epoch trained before the interruption and adds the resumed one
    assert sorted(int(r["epoch"]) for r in rows if r.get("train/loss_epoch")) == [0, 1]
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * first

    fresh = tmp_path / "fresh"
    train(compose_config("train", tiny(synth_root, "trainer.max_epochs=1"), fresh))
    train(
        compose_config(
            "train", tiny(synth_root, "trainer.max_epochs=1", "auto_resume=false"), fresh
        )
    )
    assert torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
