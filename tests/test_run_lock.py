"""One writer per run folder: a second process on a live run's folder is refused, naming the
first; a lock left by a killed process is taken over; DDP processes and a requeued job are not
refused.

The runs are tiny (9 training images in batches of 2, a three-stage network, 32 px); the
processes that must be live while the test acts are paused at a batch (``PauseAt``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covidqu.errors import RunInterrupted
from covidqu.runtime.runlock import LOCK_FILE, FolderInUse, probe, take
from covidqu.train.run import train

from pipeline_helpers import PROJECT_ROOT, QUICK, TINY, compose_config, read_metrics, run_module

BASE = [
    *TINY,
    "augment=none",
    "data.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "logger=csv",
    "model.encoder_depth=3",
    "model.decoder_channels=[32,16,8]",
]
#: The environment of a process that imports the test callbacks (``signal_helpers``).
ENV = {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")])}
HOST = socket.gethostname()


def callback(name: str, target: str, **args: object) -> list[str]:
    """Overrides adding a test callback to the run."""
    return [f"+callbacks.{name}._target_={target}"] + [
        f"+callbacks.{name}.{k}={v}" for k, v in args.items()
    ]


def snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under the run's ``.hydra/`` and ``checkpoints/``: its time and its bytes."""
    files = [*(run / ".hydra").iterdir(), *(run / "checkpoints").iterdir()]
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_a_second_process_on_a_live_run_is_refused_and_changes_nothing(synth_root, tmp_path):
    run, paused, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    args = [
        *BASE,
        f"data.root={synth_root}",
        f"hydra.run.dir={run}",
        *callback("pause", "signal_helpers.PauseAt", epoch=1, batch=0, marker=paused, until=go),
    ]
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    env.pop("COVIDQU_ROOT", None)
    with open(tmp_path / "first.log", "w") as log_file:
        first = subprocess.Popen(
            [sys.executable, "-m", "covidqu.train", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), (tmp_path / "first.log").read_text()[-3000:]
        before = snapshot(run)  # epoch 0's checkpoints and the first's .hydra/ files
        assert {"checkpoints/last.ckpt", ".hydra/overrides.yaml"} <= set(before)

        # the same command, with another seed: had Hydra written .hydra/, it would differ
        second = run_module("covidqu.train", [*args, "seed=7"], env=ENV, timeout=180)
        said = second.stdout + second.stderr
        assert second.returncode == 2, said[-3000:]
        assert "Traceback" not in said
        assert f"error: {run} is in use by another run: pid {first.pid} on host {HOST}" in said
        assert "covidqu.train" in said and "hydra.run.dir=NEW_FOLDER" in said
        assert snapshot(run) == before
        assert not (run / "failure.txt").exists()

        go.touch()
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert read_metrics(run)["epochs"] == 2
    assert not (run / LOCK_FILE).exists()  # released, the folder as a run leaves it


#: A process that takes a folder's lock and holds it until killed.
HOLD = """
import sys, time
from pathlib import Path
from covidqu.runtime.runlock import take
take(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over(synth_root, tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid} on host {HOST}"):
            probe(tmp_path)  # refused while it lives
    finally:
        holder.kill()  # SIGKILL: it cleans up nothing
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()

    with caplog.at_level(logging.WARNING, logger="covidqu.runtime.runlock"):
        train(compose_config("train", [*QUICK, f"data.root={synth_root}"], tmp_path))
    assert (tmp_path / "metrics.json").is_file()
    took = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert len(took) == 1, took
    assert f"pid {holder.pid} on host {HOST}" in took[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_interrupted_run_releases_its_folder_and_the_requeued_job_resumes(
    synth_root, tmp_path, caplog
):
    """As under Slurm: SIGTERM (preemption, a time limit), then the same job again."""
    base = [*BASE, f"data.root={synth_root}"]
    stop = callback("stop", "signal_helpers.SignalAt", epoch=1, batch=0, send="SIGTERM")
    with pytest.raises(RunInterrupted):
        train(compose_config("train", [*base, *stop], tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / LOCK_FILE).exists()

    with caplog.at_level(logging.WARNING):
        train(compose_config("train", base, tmp_path))
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    assert not any("took over" in r.getMessage() for r in caplog.records)
    assert read_metrics(tmp_path)["epochs"] == 2


@pytest.mark.slow  # the default suite has it in a sweep: test_sweeps' DDP jobs
def test_a_ddp_run_is_not_refused_by_its_own_lock(synth_root, tmp_path):
    run = tmp_path / "run"
    args = [o for o in QUICK if o != "trainer.devices=1"]
    args += ["trainer=ddp_cpu", "trainer.devices=2", f"data.root={synth_root}"]
    proc = run_module("covidqu.train", [*args, f"hydra.run.dir={run}"], timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "in use by another run" not in said
    assert read_metrics(run)["world_size"] == 2
    assert (run / "train_ddp_process_1.log").is_file()  # the second process ran here
    assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("rank", ["LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "RANK"])
def test_a_jobs_other_processes_neither_check_nor_take_the_lock(tmp_path, monkeypatch, rank):
    with take(tmp_path) as lock:  # the job's first process
        assert lock.held
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()} on host {HOST}"):
            probe(tmp_path)
        monkeypatch.setenv(rank, "1")
        probe(tmp_path)
        assert not take(tmp_path).held


def test_the_probe_writes_nothing_and_a_released_lock_leaves_no_file(tmp_path):
    fresh = tmp_path / "fresh"
    probe(fresh)
    assert not fresh.exists()
    take(fresh).release()
    assert list(fresh.iterdir()) == []
