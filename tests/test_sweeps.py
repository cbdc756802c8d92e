"""Sweeps, Optuna, failed jobs, reports and DDP on the CPU, through the real entry point."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from covidqu.report import main as report_main
from covidqu.report.study import study_figures
from covidqu.runtime.outputs import STUDY_FILE
from covidqu.runtime.runlock import LOCK_FILE

from pipeline_helpers import CONF, TINY, read_csv, read_metrics, run_module

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
    assert "1 of 2 jobs of this launch did not complete" in log
    good, bad = job_dirs(out)
    assert read_metrics(good)["val/dice"] >= 0
    failure = (bad / "failure.txt").read_text()
    assert "status: failed" in failure and "optimizer.lr=-1" in failure
    rows = {r["run"]: r for r in read_csv(out / "report.csv")}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed"
    assert "optimizer.lr=-1" in rows["1"]["error"]
    assert report_main([str(out), "--quiet"]) == 1


def study_trials(sweep_dir: Path, name: str = "lung") -> list:
    """The trials of the study kept in ``sweep_dir``'s SQLite file."""
    import optuna

    storage = f"sqlite:///{sweep_dir / STUDY_FILE}"
    return optuna.load_study(study_name=name, storage=storage).trials


@pytest.mark.slow  # three launches, three trials: about 2-3 minutes on 2 cores
def test_an_optuna_search_resumes_where_it_stopped(synth_root, tmp_path):
    """Re-running the command continues the study in the sweep folder: n_trials is the study's
    total, each trial's job folder is its own, and the resumed sampler proposes new trials."""
    search = [
        "hparams_search=optuna",
        "hydra.sweeper.params.encoder='choice(resnet18)'",
        "hydra.sweeper.params.augment='choice(none, light)'",
        "hydra.sweeper.params.loss='choice(dice, dice_bce)'",
    ]
    out, proc = sweep(synth_root, tmp_path, *search, "hydra.sweeper.n_trials=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [j.name for j in job_dirs(out)] == ["0", "1"]
    first = {j.name: (j / "metrics.json").read_bytes() for j in job_dirs(out)}

    out, proc = sweep(synth_root, tmp_path, *search, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of hydra.sweeper.n_trials=3 trials done, 1 to run" in proc.stdout + proc.stderr
    jobs = job_dirs(out)
    assert [j.name for j in jobs] == ["0", "1", "2"]
    assert {j: (out / j / "metrics.json").read_bytes() for j in first} == first  # untouched
    trials = study_trials(out)
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(3)]
    for trial, job in zip(trials, jobs, strict=True):  # each trial ran in its own folder
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"loss={trial.params['loss']}" in overrides
        assert trial.value == pytest.approx(read_metrics(job)["val/dice"])
    # seeded as at the first launch, the sampler would propose trial 0 again
    assert trials[2].params["optimizer.lr"] != trials[0].params["optimizer.lr"]
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in trials))
    assert set(results["best_params"]) >= {"optimizer.lr", "loss", "augment"}

    # a third time: the study has its 3 trials, nothing runs
    out, proc = sweep(synth_root, tmp_path, *search, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to run: raise hydra.sweeper.n_trials" in proc.stdout + proc.stderr
    assert len(study_trials(out)) == 3 and len(job_dirs(out)) == 3

    # another list of losses is another study: refused before any trial, naming the key
    changed = [*search[:3], "hydra.sweeper.params.loss='choice(dice, focal)'"]
    out, proc = sweep(synth_root, tmp_path, *changed, "hydra.sweeper.n_trials=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: hydra.sweeper.params.loss searches" in proc.stderr
    assert "hydra.sweeper.study_name=" in proc.stderr and "Traceback" not in proc.stderr
    assert len(study_trials(out)) == 3 and len(job_dirs(out)) == 3

    # the report page's figures of the study: its history and its parameter importances
    figures = study_figures(out)
    assert [title.rsplit(": ", 1)[1] for title, _ in figures] == [
        "optimisation history",
        "parameter importances",
    ]
    for _, png in figures:
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[0] > 100


def test_no_study_figures_where_a_folder_holds_no_study(tmp_path):
    (tmp_path / "0").mkdir()  # a sweep of another kind: job folders, no study file
    assert study_figures(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["0"]  # nor was a study file made


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
    assert [t.state.name for t in study_trials(out)] == ["FAIL", "FAIL"]
    assert not (out / "optimization_results.yaml").exists()  # no trial has a value
    assert [title for title, _ in study_figures(out)] == ["Optuna study lung: optimisation history"]


def test_optuna_records_a_failed_trial_as_failed_and_goes_on(synth_root, tmp_path):
    """A job that fails is a FAIL trial of the study, never its best, and the search goes on:
    the study's best trial, and optimization_results.yaml, are the completed one's. The two
    trials are enqueued in the study before the search: cross-entropy first, which refuses the
    binary lung mask at its first step, so that trial fails; then the Dice loss."""
    import optuna

    out = tmp_path / "sweep"
    out.mkdir()
    study = optuna.create_study(
        study_name="lung", storage=f"sqlite:///{out / STUDY_FILE}", direction="maximize"
    )
    for loss in ("ce", "dice"):  # every searched parameter given (encoder and batch size: TINY)
        study.enqueue_trial({"optimizer.lr": 1e-3, "augment": "none", "loss": loss})
    out, proc = sweep(
        synth_root,
        tmp_path,
        "trainer.limit_val_batches=1",
        "test=false",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params.loss='choice(dice, ce)'",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the sweep says so
    study = optuna.load_study(study_name="lung", storage=f"sqlite:///{out / STUDY_FILE}")
    failed, completed = study.trials
    assert (failed.params["loss"], failed.state.name, failed.value) == ("ce", "FAIL", None)
    assert completed.params["loss"] == "dice" and completed.state.name == "COMPLETE"
    assert study.best_trial.number == completed.number == 1

    jobs = job_dirs(out)
    assert [j.name for j in jobs] == ["0", "1"]
    assert (jobs[0] / "failure.txt").is_file() and (jobs[1] / "metrics.json").is_file()
    assert completed.value == pytest.approx(read_metrics(jobs[1])["val/dice"])
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert results["best_params"]["loss"] == "dice"
    assert results["best_value"] == pytest.approx(completed.value)


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


@pytest.mark.parametrize(
    ("trainer", "cuda", "on_gpu"),
    [
        ("cpu", True, False),
        ("gpu", False, True),
        ("ddp", False, True),
        ("default", False, False),
        ("default", True, True),
    ],
)
def test_the_search_offers_gpu_augmentations_only_to_a_cuda_trainer(
    monkeypatch: pytest.MonkeyPatch, trainer: str, cuda: bool, on_gpu: bool
):
    """The augment choices the sweeper parses from the composed config: batch augmentation on
    the device joins them where the trainer runs on CUDA (trainer=default: where CUDA is)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hparams_search=optuna", f"trainer={trainer}"],
            return_hydra_config=True,
        )
    params = cfg.hydra.sweeper.params
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    choices = distributions["augment"].choices
    gpu = {"gpu_light", "gpu_strong"} if on_gpu else set()
    assert set(choices) == {"none", "light", "strong", *gpu}
    assert all((CONF / "augment" / f"{choice}.yaml").is_file() for choice in choices)


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(143)])
def test_an_interrupted_trial_is_failed_and_run_again(stop: BaseException):
    """Ctrl-C, or a job's SIGTERM (which ends the job's process in SystemExit), stops the
    search: the trials under way are FAIL trials marked interrupted, which n_trials leaves out,
    so the next launch runs as many again."""
    import optuna
    from optuna.trial import TrialState

    from covidqu.runtime.sweeper import INTERRUPTED, ResumingSweeper, consecutive, counted

    class Stopped:
        def launch(self, overrides, initial_job_idx):
            raise stop

    sweeper = ResumingSweeper(
        sampler=None,
        direction="maximize",
        storage=None,
        study_name=None,
        n_trials=3,
        n_jobs=2,
        max_failure_rate=0.0,
        search_space=None,
        custom_search_space=None,
        params=None,
    )
    sweeper.launcher = Stopped()
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    trials = [study.ask(), study.ask()]
    with pytest.raises(type(stop)):
        sweeper._launch(study, trials, [["loss=dice"], ["loss=dice"]], ["maximize"])
    states = [(t.state, t.user_attrs.get(INTERRUPTED)) for t in study.trials]
    assert states == [(TrialState.COMPLETE, None)] + [(TrialState.FAIL, True)] * 2
    assert counted(study.trials) == 1
    # a number another process took splits a launch, so that job folders follow trial numbers
    study.ask()  # trial 3, elsewhere
    runs = consecutive([*trials, study.ask()])
    assert [[t.number for t in run] for run in runs] == [[1, 2], [4]]


def _job(sweep_dir: Path, name: str, completed: bool, at: int) -> None:
    """A job folder as a finished job leaves it: its config, then metrics.json or failure.txt,
    stamped ``at`` seconds (jobs seconds apart, as real ones are, whatever the clock's grain)."""
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    written = [
        job / ".hydra" / "config.yaml",
        job / ("metrics.json" if completed else "failure.txt"),
    ]
    written[0].write_text("task: {monitor: val/dice}\n")
    written[1].write_text(json.dumps({"val/dice": 0.5}) if completed else "error: it failed\n")
    for path in written:
        os.utime(path, (at, at))


@pytest.mark.parametrize("new_job_fails", [False, True])
def test_a_sweep_fails_for_its_own_jobs_not_an_earlier_launchs(tmp_path, new_job_fails):
    """A resumed study keeps the folders of its earlier failed trials: the launch that adds a
    completed trial exits 0 (naming the earlier failure), one whose own job fails exits 1."""
    from omegaconf import OmegaConf

    from covidqu.report.sweep import SweepSummary

    out = tmp_path / "sweep"
    _job(out, "0", completed=False, at=1_000)  # the earlier launch: a failed trial
    _job(out, "1", completed=True, at=1_010)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(out)}}})
    summary = SweepSummary()
    summary.on_multirun_start(config)
    _job(out, "2", completed=not new_job_fails, at=2_000)  # this launch's trial
    if new_job_fails:
        with pytest.raises(SystemExit) as exit_:
            summary.on_multirun_end(config)
        assert exit_.value.code == 1
    else:
        summary.on_multirun_end(config)  # no SystemExit
    # a job re-run in a folder an earlier launch used counts as this launch's
    summary.on_multirun_start(config)
    _job(out, "1", completed=False, at=3_000)
    with pytest.raises(SystemExit):
        summary.on_multirun_end(config)
