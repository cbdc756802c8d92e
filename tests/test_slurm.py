"""``hydra/launcher=slurm`` on a real Slurm cluster, run as users run it.

A two-job sweep goes through sbatch; each job trains with DDP over two Slurm tasks (gloo on the
CPU), which Lightning joins through its SLURM environment rather than spawning processes itself.
CI starts a one-node cluster on the test machine first (``sudo bash .ci/slurm-up.sh``). Where no
cluster answers, or its nodes are not this machine (pytest's temporary folders must be visible
to the jobs), the test skips, saying why. To run it against another cluster anyway, set
``COVIDQU_SLURM_PARTITION`` and give pytest a ``--basetemp`` on a file system the nodes share.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline_helpers import PROJECT_ROOT, TINY, read_metrics

#: The whole sweep, queueing included; the two jobs take about a minute on two cores.
SWEEP_TIMEOUT_S = 600
#: How long the sweep may wait with none of its jobs left in the queue (a job killed without
#: leaving a result, which the launcher cannot see on a cluster without accounting).
ORPHAN_GRACE_S = 60
#: Printed by the batch script before the tasks start (hydra.launcher.setup).
SETUP_MARK = "covidqu-slurm-setup-ran"
START_HINT = "start a local one-node cluster with: sudo bash .ci/slurm-up.sh"
USABLE_STATES = {"idle", "mixed", "mix", "allocated", "alloc", "completing", "comp"}


@dataclass(frozen=True)
class Cluster:
    partition: str
    cpus: int


def _run(cmd: list[str], timeout: float = 5) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def find_cluster() -> Cluster | str:
    """The partition to submit to, or why there is none to use."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"no Slurm client (sinfo, sbatch) on PATH; {START_HINT}"
    proc = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%T|%c"])
    if proc is None or proc.returncode != 0:
        why = "timed out" if proc is None else (proc.stderr.strip() or f"exit {proc.returncode}")
        return f"the Slurm cluster does not answer (sinfo: {why}); {START_HINT}"
    wanted = os.environ.get("COVIDQU_SLURM_PARTITION")
    here = {"localhost", socket.gethostname(), socket.getfqdn()}
    candidates: list[tuple[bool, Cluster]] = []
    for line in proc.stdout.splitlines():
        try:
            node, partition, state, cpus = line.strip().split("|")
        except ValueError:
            continue
        default = partition.endswith("*")
        partition = partition.rstrip("*")
        if state.rstrip("*~#!%$@^-+").lower() not in USABLE_STATES or not cpus.isdigit():
            continue
        if wanted:
            if partition == wanted:
                candidates.append((default, Cluster(partition, int(cpus))))
        elif node in here:
            candidates.append((default, Cluster(partition, int(cpus))))
    if not candidates:
        if wanted:
            return f"no usable node in partition {wanted!r} (COVIDQU_SLURM_PARTITION)"
        return (
            "no usable Slurm node on this machine (the jobs must see pytest's temporary folders); "
            "set COVIDQU_SLURM_PARTITION and a shared --basetemp to use another cluster"
        )
    candidates.sort(key=lambda c: (not c[0], -c[1].cpus))  # the default partition first
    cluster = candidates[0][1]
    if cluster.cpus < 2:
        return f"partition {cluster.partition!r} has nodes of {cluster.cpus} CPU; two are needed"
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    found = find_cluster()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _array_ids(sweep: Path) -> list[str]:
    """Slurm job ids of the sweep's submissions, from the launcher's bookkeeping folders."""
    folder = sweep / ".submitit"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]
    return sorted({name.split("_")[0] for name in names})


def _queued(job_ids: list[str]) -> bool:
    proc = _run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)])
    if proc is None:  # no answer this time: assume nothing changed
        return True
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _task_logs(sweep: Path) -> str:
    texts = []
    for path in sorted((sweep / ".submitit").glob("*/*_log.*")):
        texts.append(f"----- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
    return "\n".join(texts)


def run_sweep(args: list[str], sweep: Path) -> tuple[int, str]:
    """``python -m covidqu.train -m ARGS`` as a user runs it; its exit code and output.

    Fails (cancelling the jobs) when the sweep outlives :data:`SWEEP_TIMEOUT_S`, or waits on jobs
    that have left the queue without a result.
    """
    env = {k: v for k, v in os.environ.items() if k != "COVIDQU_ROOT"}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = sweep.parent / f"{sweep.name}.launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covidqu.train", "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PROJECT_ROOT,
            start_new_session=True,
        )
        started = time.monotonic()
        last_seen = started
        problem = ""
        try:
            while proc.poll() is None:
                time.sleep(2)
                now = time.monotonic()
                ids = _array_ids(sweep)
                if not ids or _queued(ids):
                    last_seen = now
                elif now - last_seen > ORPHAN_GRACE_S:
                    problem = f"jobs {ids} left the queue {ORPHAN_GRACE_S}s ago without a result"
                    break
                if now - started > SWEEP_TIMEOUT_S:
                    problem = f"the sweep took longer than {SWEEP_TIMEOUT_S}s"
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                ids = _array_ids(sweep)
                if ids:
                    _run(["scancel", *ids])
    output = log_path.read_text(errors="replace")
    if problem:
        pytest.fail(f"{problem}\n{output[-4000:]}\n{_task_logs(sweep)}")
    return proc.returncode, output


# slow: a real Slurm queue and DDP jobs (about a minute); CI runs it with -m slow
@pytest.mark.slow
def test_sweep_runs_ddp_jobs_through_slurm(cluster, synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("trainer.devices=")]
    args = [
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        f"hydra.launcher.partition={cluster.partition}",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        f'hydra.launcher.setup=["echo {SETUP_MARK}"]',
        *tiny,
        f"data.root={synth_root}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "model=unet,fpn",
    ]
    code, output = run_sweep(args, sweep)
    assert code == 0, f"{output[-4000:]}\n{_task_logs(sweep)}"

    # One Slurm array of two jobs; each job's two tasks left their own logs.
    folders = (sweep / ".submitit").iterdir()
    job_dirs = sorted(p for p in folders if re.fullmatch(r"\d+_\d+", p.name))
    assert [p.name.split("_")[1] for p in job_dirs] == ["0", "1"], job_dirs
    for number, job_dir in enumerate(job_dirs):
        run_dir = sweep / str(number)
        logs = {
            task: "".join(p.read_text(errors="replace") for p in job_dir.glob(f"*_{task}_log.*"))
            for task in (0, 1)
        }
        context = f"job {job_dir.name}:\n{_task_logs(sweep)}"
        # Slurm started both processes and Lightning made them one world of two: each task
        # initialised its own rank, and no task spawned a world of its own.
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0], context
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1], context
        assert "MEMBER: 2/2" not in logs[0] and "MEMBER: 1/2" not in logs[1], context
        assert SETUP_MARK in logs[0], context

        metrics = read_metrics(run_dir)
        assert 0.0 <= metrics["val/dice"] <= 1.0
        assert "test/dice" in metrics
        if "world_size" in metrics:
            assert metrics["world_size"] == 2
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert (run_dir / "csv" / "metrics.csv").is_file()
        assert not (run_dir / "failure.txt").exists()

    overrides = [(sweep / str(n) / ".hydra" / "overrides.yaml").read_text() for n in (0, 1)]
    assert "model=unet" in overrides[0] and "model=fpn" in overrides[1]
    # Nothing but the two job folders (and the launcher's bookkeeping) in the sweep folder.
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0", "1"]


def test_launcher_asks_for_one_task_per_device(tmp_path):
    """Resources follow the trainer; an `auto` device count is refused with the fix."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pipeline_helpers import CONF

    def launcher(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
            )
        return cfg.hydra.launcher

    gpu = launcher("trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    assert (gpu.tasks_per_node, gpu.gpus_per_node, gpu.nodes) == (4, 4, 2)
    cpu = launcher("trainer=ddp_cpu", "trainer.devices=2")
    assert (cpu.tasks_per_node, cpu.gpus_per_node) == (2, None)
    auto = launcher("trainer=default")
    with pytest.raises(Exception, match=r"trainer.devices must be a number.*trainer=ddp"):
        OmegaConf.to_container(auto, resolve=True)
