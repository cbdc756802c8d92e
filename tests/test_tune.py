"""The learning-rate finder (``tune=lr``): Lightning's, its plot and suggestion in the run
folder, training with it (``tune.apply=true``), and what is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import pytest
import torch
from omegaconf import OmegaConf

from covidqu.errors import ConfigError
from covidqu.report.run import find_runs, rows
from covidqu.runtime.checks import check_values
from covidqu.train.checks import check_tune
from covidqu.train.run import train
from covidqu.train.tune import find_lr

from pipeline_helpers import QUICK, compose_config, read_metrics, run_module

#: The finder's settings of these tests: the fewest steps that give a suggestion.
FINDER = ["tune=lr", "tune.num_training=13", "tune.min_lr=1e-6", "tune.max_lr=0.5"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tuned(module_tmp, synth_root: Path) -> dict[str, Any]:
    """A tiny run that finds its learning rate and trains with it (no scheduler: the
    optimizer's rate stays the one it started with)."""
    out = module_tmp("tuned")
    overrides = [*QUICK, f"data.root={synth_root}", *FINDER, "tune.apply=true", "scheduler=none"]
    train(compose_config("train", overrides, out))
    record = json.loads((out / "lr_find.json").read_text())
    return {"dir": out, "record": record, "lr": record["suggestion"]}


@pytest.mark.slow  # the module's tiny run: the finder's 13 steps, then an epoch of training
def test_the_finder_writes_its_plot_and_a_suggestion_in_the_range(tuned):
    png = (tuned["dir"] / "lr_find.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    picture = cv2.imread(str(tuned["dir"] / "lr_find.png"))
    assert picture is not None and picture.shape[0] > 100 and picture.std() > 0
    record = tuned["record"]
    assert 1e-6 <= tuned["lr"] <= 0.5
    assert record["steps"] == 13 == len(record["lr"]) == len(record["loss"])  # the whole curve
    assert record["lr"][0] == pytest.approx(1e-6)
    assert record["lr"] == sorted(record["lr"])
    assert tuned["lr"] in record["lr"]  # a rate it tried, as Lightning suggests
    assert not list(tuned["dir"].glob(".lr_find_*.ckpt"))  # Lightning's own state, removed


@pytest.mark.slow
def test_apply_trains_with_the_suggested_rate_and_records_it(tuned):
    run, lr = tuned["dir"], tuned["lr"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert group["lr"] == pytest.approx(lr)
    assert OmegaConf.load(run / "config.yaml").optimizer.lr == pytest.approx(lr)
    metrics = read_metrics(run)
    assert metrics["tuned_lr"] == pytest.approx(lr)
    assert metrics["epochs"] == 1  # trained as configured after the finder's steps
    assert lr != pytest.approx(1e-3)  # not the configured rate (the finder changed it)


@pytest.mark.slow
def test_tune_lr_alone_finds_the_rate_and_stops(synth_root, tmp_path):
    run = tmp_path / "run"
    proc = run_module(
        "covidqu.train",
        [*QUICK, f"data.root={synth_root}", *FINDER, f"hydra.run.dir={run}"],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "lr_find.json").read_text())
    assert 1e-6 <= record["suggestion"] <= 0.5
    assert (run / "lr_find.png").read_bytes().startswith(PNG_SIGNATURE)
    assert f"suggest optimizer.lr={record['suggestion']:.3g}" in proc.stderr + proc.stdout
    assert not (run / "checkpoints").exists()  # it stopped before training
    assert not (run / "metrics.json").exists()
    (row,) = rows(find_runs(run), run)  # the report: done as asked, not unfinished
    assert (row["status"], row["tuned_lr"]) == ("tuned", pytest.approx(record["suggestion"]))


def _tune_cfg(*overrides: str) -> Any:
    return compose_config("train", ["tune=lr", *overrides], Path("/tmp/unused"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tune.num_training=5", "tune.num_training"),
        ("tune.min_lr=0", "tune.min_lr"),
        ("tune.max_lr=-1", "tune.max_lr"),
        ("tune.mode=cubic", "tune.mode"),
        ("tune.early_stop_threshold=0.5", "tune.early_stop_threshold"),
        ("tune.apply=maybe", "tune.apply"),
    ],
)
def test_bad_finder_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_values(_tune_cfg(override), "train")


def test_good_finder_values_pass():
    check_values(_tune_cfg("tune.early_stop_threshold=null", "tune.mode=linear"), "train")
    check_tune(_tune_cfg("trainer.devices=1"))
    check_tune(compose_config("train", ["trainer.devices=4"], Path("/tmp/unused")))  # tune=none


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["tune.min_lr=0.1", "tune.max_lr=0.01"], "tune.min_lr=0.1 must be below tune.max_lr"),
        (["trainer=ddp_cpu"], "trainer.devices=2"),
        (["trainer.devices=[0,1]"], "trainer.devices"),
        (["trainer.devices=1", "trainer.num_nodes=2"], "trainer.num_nodes=2"),
        (["trainer.fast_dev_run=true"], "trainer.fast_dev_run"),
    ],
)
def test_combinations_the_finder_cannot_run_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        check_tune(_tune_cfg(*overrides))


def test_the_finder_refuses_a_trainer_of_several_processes():
    """``trainer.devices=auto`` is only counted once the trainer exists (several GPUs)."""
    cfg = _tune_cfg("trainer.devices=auto")
    trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"one device.*trainer\.devices=auto"):
        find_lr(cfg, trainer, None, None, Path("/tmp/unused"), None)
    untuned = compose_config("train", [], Path("/tmp/unused"))
    assert find_lr(untuned, trainer, None, None, Path("/tmp/unused"), None) is None


def test_a_schedule_is_planned_afresh_after_the_finder_restores_its_state():
    """The finder saves the state before its steps and restores it: the module then holds a
    checkpoint of step 0 planned for the finder's own run length. Nothing of that schedule ran,
    so the real run plans its own (a one-cycle schedule would otherwise be refused)."""
    from dataclasses import asdict
    from functools import partial

    from covidqu.models.schedulers import Resumed, RunSteps, one_cycle, plan_steps

    cycle = partial(one_cycle, max_lr_factor=10.0)
    finders = plan_steps(cycle, RunSteps(130, 10, 1, 13, -1), None, {})
    run = RunSteps(20, 10, 1, 2, -1)
    plan = plan_steps(cycle, run, Resumed(0, asdict(finders), {}, {}), {})
    assert plan == plan_steps(cycle, run, None, {})
    assert plan.total_steps == 20
