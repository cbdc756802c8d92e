"""Sweeps, Optuna, failed jobs, reports and DDP on the CPU, through the real entry point."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from covidqu.report import main as report_main
from covidqu.runtime.runlock import LOCK_FILE

from pipeline_helpers import PROJECT_ROOT, TINY, read_csv, read_metrics, run_module

#: Short jobs: one epoch of two batches, one batch to validate and test.
SHORT = [
    *TINY,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "callbacks.early_stopping=null",
]
#: Two DDP processes on the CPU (after TINY, which asks for one device).
DDP_CPU = ["trainer=ddp_cpu", "trainer.devices=2"]


def sweep(synth_root: Path, tmp_path: Path, *overrides: str) -> tuple[Path, object]:
    out = tmp_path / "sweep"
    proc = run_module(
        "covidqu.train",
        ["-m", *SHORT, f"data.root={synth_root}", f"hydra.sweep.dir={out}", *overrides],
        env={"PROJECT_ROOT": str(tmp_path / "project")},
    )
    return out, proc


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_a_2x2_sweep_and_its_report(synth_root, tmp_path):
    out, proc = sweep(synth_root, tmp_path, "model=unet,fpn", "loss=dice,dice_bce")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(out)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combos = set()
    for job in jobs:
        metrics = read_metrics(job)
        assert "val/dice" in metrics and "test/dice" in metrics
        assert (job / "checkpoints" / "best.ckpt").is_file()
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        combos.add(tuple(o for o in overrides if o.startswith(("model=", "loss="))))
    assert len(combos) == 4
    # the sweep's own summary was written at its end
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    # and printed within the width of a terminal (80 where output is not one), 8 columns at
    # most (it was 27 columns, 378 characters wide); the files hold every column
    width = int(os.environ.get("COLUMNS", 80))
    summary = proc.stdout[proc.stdout.index("run(s) under") :].splitlines()
    lines = [line for line in summary if line[:1] in "┏┃┡│└"]
    assert lines and max(len(line) for line in lines) <= width, "\n".join(lines)
    assert lines[0].count("┳") + 1 <= 8
    assert len(read_csv(out / "report.csv")[0]) > 8
    # and the report command lists the 4 runs, best first
    (out / "report.csv").unlink()
    assert report_main([str(out), "--quiet"]) == 0
    rows = read_csv(out / "report.csv")
    assert len(rows) == 4
    assert {r["model"] for r in rows} == {"unet", "fpn"} and {r["loss"] for r in rows} == {
        "dice",
        "dice_bce",
    }
    scores = [float(r["val/dice"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["epochs"] == "1" and float(r["duration_s"]) > 0 for r in rows)


def _finished_run(folder: Path, lr: str, figures: dict, monitor: str, mode: str) -> None:
    """A run folder as a training job leaves it: Hydra's config and overrides, metrics.json."""
    (folder / ".hydra").mkdir(parents=True)
    config = {"task": {"monitor": monitor, "monitor_mode": mode}, "optimizer": {"lr": float(lr)}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}"]))
    metrics = {**figures, "monitor": monitor, "epochs": 3, "duration_s": 10.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize(
    ("monitor", "mode", "order"),
    [("val/loss", "min", ["1", "2", "0", "3"]), ("val/dice", "max", ["0", "2", "1", "3"])],
)
def test_report_ranks_runs_by_their_monitor_mode(
    tmp_path, capsys: pytest.CaptureFixture, monitor: str, mode: str, order: list[str]
):
    """A minimised monitor (a loss, an error) ranks the smallest value first."""
    from covidqu.report.run import find_runs, sort_runs

    out = tmp_path / "sweep"
    figures = {  # the loss and the Dice disagree, so each mode gives its own order
        "0": {"val/loss": 0.40, "val/dice": 0.91},
        "1": {"val/loss": 0.12, "val/dice": 0.55},
        "2": {"val/loss": 0.25, "val/dice": 0.70},
    }
    for job, lr in zip(figures, ("0.1", "0.01", "0.001"), strict=True):
        _finished_run(out / job, lr, figures[job], monitor, mode)
    (out / "3" / ".hydra").mkdir(parents=True)  # a job still running: no score, ranked last
    (out / "3" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task": {}}))

    assert [r.path.name for r in sort_runs(find_runs(out))] == order
    assert report_main([str(out)]) == 0
    printed = capsys.readouterr().out
    shown = [f"{figures[job][monitor]:.4g}" for job in order[:3]]
    positions = [printed.index(f" {value} ") for value in shown]
    assert positions == sorted(positions), (shown, printed)
    rows = read_csv(out / "report.csv")
    assert [r["run"] for r in rows] == order
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["incomplete"]
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == order


def test_a_failed_job_does_not_stop_the_sweep(synth_root, tmp_path):
    out, proc = sweep(synth_root, tmp_path, "optimizer.lr=0.001,-1")
    assert proc.returncode == 1  # the sweep ends saying a job failed
    log = proc.stdout + proc.stderr
    assert "1 of 2 jobs did not complete" in log
    good, bad = job_dirs(out)
    assert read_metrics(good)["val/dice"] >= 0
    failure = (bad / "failure.txt").read_text()
    assert "status: failed" in failure and "optimizer.lr=-1" in failure
    rows = {r["run"]: r for r in read_csv(out / "report.csv")}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed"
    assert "optimizer.lr=-1" in rows["1"]["error"]
    assert report_main([str(out), "--quiet"]) == 1


def test_optuna_search_of_three_trials(synth_root, tmp_path):
    out, proc = sweep(
        synth_root,
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params.encoder='choice(resnet18)'",
        "hydra.sweeper.params.augment='choice(none, light)'",
        "hydra.sweeper.params.loss='choice(dice, dice_bce)'",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(out)
    assert len(jobs) == 3
    values = [read_metrics(j)["val/dice"] for j in jobs]
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(values))
    assert set(results["best_params"]) >= {"optimizer.lr", "loss", "augment"}


def test_failed_trials_do_not_crash_optuna(synth_root, tmp_path):
    # cross-entropy refuses a binary segmentation target: every trial fails at once
    out, proc = sweep(
        synth_root,
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params.loss='choice(ce)'",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert all((j / "failure.txt").is_file() for j in job_dirs(out))
    assert len(job_dirs(out)) == 2


#: ``python -m covidqu.train`` with Optuna's study kept: the trials argv[2] gives (JSON: a list
#: of parameter dicts) are enqueued first, and every trial's number, state, value and parameters,
#: with the best trial's number, are written as JSON to argv[1] when the sweep ends (the study
#: lives in memory only: optuna's own SQLite storage needs an older SQLAlchemy).
RECORD_STUDY = """
import atexit, json, runpy, sys
import optuna
path, queue = sys.argv.pop(1), json.loads(sys.argv.pop(1))
studies = []
create = optuna.create_study
def keep(*args, **kwargs):
    studies.append(create(*args, **kwargs))
    for params in queue:
        studies[-1].enqueue_trial(params)
    return studies[-1]
optuna.create_study = keep
def dump():
    (study,) = studies
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
        for t in study.trials
    ]
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trial.number if completed else None
    with open(path, "w") as fh:
        json.dump({"direction": study.direction.name, "trials": trials, "best": best}, fh)
atexit.register(dump)
runpy.run_module("covidqu.train", run_name="__main__", alter_sys=True)
"""


def test_optuna_records_a_failed_trial_as_the_worst_never_the_best(synth_root, tmp_path):
    """A job that fails returns the worst value for the direction (-inf when maximising
    val/dice), so Optuna ranks it last: the study's best trial, and optimization_results.yaml,
    are the completed one's. The two trials are enqueued: cross-entropy first, which refuses
    the binary lung mask at its first step, so that trial fails; then the Dice loss."""
    out, record = tmp_path / "sweep", tmp_path / "study.json"
    args = [
        "-m",
        *SHORT,
        "trainer.limit_val_batches=1",
        "test=false",
        f"data.root={synth_root}",
        f"hydra.sweep.dir={out}",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params.loss='choice(dice, ce)'",
    ]
    # every searched parameter given (encoder and batch size are fixed by TINY's overrides)
    queue = [{"optimizer.lr": 1e-3, "augment": "none", "loss": loss} for loss in ("ce", "dice")]
    env = {k: v for k, v in os.environ.items() if k != "COVIDQU_ROOT"}
    env.update(PYTHONUNBUFFERED="1", PROJECT_ROOT=str(tmp_path / "project"))
    proc = subprocess.run(
        [sys.executable, "-c", RECORD_STUDY, str(record), json.dumps(queue), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the sweep says so
    study = json.loads(record.read_text())
    assert study["direction"] == "MAXIMIZE"
    by_loss = {t["params"]["loss"]: t for t in study["trials"]}
    assert sorted(by_loss) == ["ce", "dice"]
    failed, completed = by_loss["ce"], by_loss["dice"]
    assert failed["state"] == "FAIL" or failed["value"] == -math.inf, failed
    assert completed["state"] == "COMPLETE" and math.isfinite(completed["value"]), completed
    assert study["best"] == completed["number"]

    jobs = job_dirs(out)
    assert len(jobs) == 2
    done = [j for j in jobs if (j / "metrics.json").is_file()]
    assert len(done) == 1 and sum((j / "failure.txt").is_file() for j in jobs) == 1
    assert completed["value"] == pytest.approx(read_metrics(done[0])["val/dice"])
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert results["best_params"]["loss"] == "dice"
    assert results["best_value"] == pytest.approx(completed["value"])


def test_ddp_cpu_inside_a_sweep_counts_every_test_image_once(synth_root, tmp_path):
    # a single-task and the two-output task: both run their jobs on two processes
    out, proc = sweep(synth_root, tmp_path, *DDP_CPU, "task=lung,multitask")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(out)
    assert len(jobs) == 2
    multitask = read_metrics(jobs[1])
    assert {"test/dice", "test/acc", "test/f1_macro", "val/loss_cls"} <= set(multitask)
    for job in jobs:
        assert read_metrics(job)["world_size"] == 2
        rows = read_csv(job / "per_image.csv")
        assert len(rows) == 9 and len({r["id"] for r in rows}) == 9  # 9 test images, no repeats
        assert (job / "train_ddp_process_1.log").is_file()  # both processes logged here
        assert not (job / LOCK_FILE).exists()  # held by the first process alone, released
    # no stray folders from the re-launched processes, nothing written elsewhere
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "project").exists()
    # the split-level figures equal a single-process evaluation of the same checkpoint
    metrics = read_metrics(jobs[0])
    ev = tmp_path / "eval"
    proc = run_module(
        "covidqu.eval",
        [
            f"ckpt_path={jobs[0] / metrics['best_checkpoint']}",
            f"data.root={synth_root}",
            "data.num_workers=0",
            "num_overlays=0",
            f"hydra.run.dir={ev}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_metrics(ev)
    assert single["images"] == 9
    for name in ("dice", "iou", "sensitivity", "specificity", "precision"):
        assert math.isclose(single[f"test/{name}"], metrics[f"test/{name}"], abs_tol=1e-5), name
