"""Interrupting a run (SIGTERM, Ctrl-C) and resuming it: nothing lost, nothing logged twice.

Every run here is tiny and deterministic: 9 training images in batches of 2 (the last dropped),
so 4 steps per epoch, 2 epochs, no augmentation, ``trainer.deterministic``. Runs are stopped
after batch 1 of epoch 1 (global step 6), in the middle of an epoch.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from covidqu.data.datamodule import LungDataModule
from covidqu.data.loading import EpochSampler
from covidqu.errors import RunInterrupted
from covidqu.train.run import train

from pipeline_helpers import PROJECT_ROOT, TINY, compose_config, read_csv, read_metrics
from shared_folders import SharedFolders, copy_shared

BASE = [
    *TINY,
    "augment=none",
    "trainer.deterministic=true",
    "data.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    # a small network: the checkpoints written at every epoch and stop are most of the time
    "model.encoder_depth=3",
    "model.decoder_channels=[32,16,8]",
]
STEPS_PER_EPOCH = 4


def overrides(root: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.root={root}", *extra]


def stop_at(epoch: int, batch: int, **kw: str) -> list[str]:
    """Overrides adding the test callback that stops the run after that batch."""
    args = {"epoch": epoch, "batch": batch, **kw}
    return [
        "+callbacks.stop_at._target_=signal_helpers.SignalAt",
        *(f"+callbacks.stop_at.{k}={v}" for k, v in args.items()),
    ]


@pytest.fixture(scope="module")
def reference(synth_root: Path, shared_folders: SharedFolders) -> Path:
    """The uninterrupted run every interrupted one is compared with; it also keeps the
    checkpoint of each epoch's end in ``epochs/``. Built once per session, read-only."""

    def build(out: Path) -> None:
        every_epoch = [
            "+callbacks.every_epoch._target_=pytorch_lightning.callbacks.ModelCheckpoint",
            f"+callbacks.every_epoch.dirpath={out / 'epochs'}",
            "+callbacks.every_epoch.filename='{epoch}'",
            "+callbacks.every_epoch.save_top_k=-1",
            "+callbacks.every_epoch.monitor=null",
            "+callbacks.every_epoch.mode=max",  # a state key of its own beside last_checkpoint
        ]
        train(compose_config("train", overrides(synth_root, *every_epoch), out))

    return shared_folders.get("resume-reference", build)


def cells(run: Path) -> list[tuple[int, str, str]]:
    """``(step, metric, value)`` of every filled cell of the run's csv/metrics.csv."""
    out = []
    for row in read_csv(run / "csv" / "metrics.csv"):
        step = int(row["step"])
        out += [(step, k, v) for k, v in row.items() if k not in ("step", "epoch") and v != ""]
    return out


def assert_same_log(run: Path, reference: Path, resumed_mid_epoch: int | None = None) -> None:
    """No (step, metric) twice, the same ones as the reference, with the same values.

    After a resume in the middle of epoch ``resumed_mid_epoch``, that epoch's training means
    (``train/*`` other than per step) cover only the batches after the resume: their values
    are left out of the comparison, not their presence. So are the speed figures (``perf/*``,
    measured by the clock) everywhere.
    """
    got, want = cells(run), cells(reference)
    twice = [key for key, n in Counter((s, m) for s, m, _ in got).items() if n > 1]
    assert not twice, f"rows logged twice: {twice[:5]}"
    assert sorted((s, m) for s, m, _ in got) == sorted((s, m) for s, m, _ in want)

    def comparable(step: int, metric: str) -> bool:
        if metric.startswith("perf/"):
            return False
        if resumed_mid_epoch is None or not metric.startswith("train/"):
            return True
        in_epoch = step // STEPS_PER_EPOCH == resumed_mid_epoch
        return not in_epoch or metric.endswith("_step")

    values = {(s, m): float(v) for s, m, v in want}
    for step, metric, value in got:
        if comparable(step, metric):
            assert float(value) == pytest.approx(values[step, metric], abs=1e-5), (step, metric)


def assert_same_figures(run: Path, reference: Path) -> None:
    got, want = read_metrics(run), read_metrics(reference)
    assert got["epochs"] == want["epochs"] == 2
    figures = [k for k in want if k.startswith("val/")]
    assert figures
    for key in figures:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key


def loader_position(ckpt: Path) -> list[dict[str, int]]:
    state = torch.load(ckpt, weights_only=True)  # plain types only
    return state["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def test_sigterm_to_the_process_group_mid_epoch_then_resume(synth_root, reference, tmp_path):
    """A scheduler's SIGTERM to the whole process group, DataLoader workers included."""
    run = tmp_path / "run"
    marker = tmp_path / "at-batch"
    args = [
        *overrides(synth_root, "data.num_workers=2"),
        *stop_at(1, 1, marker=str(marker)),
        f"hydra.run.dir={run}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "COVIDQU_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")])
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidqu.train", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached the batch to stop after"
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    said = "interrupted by SIGTERM at epoch 1, step 6; checkpoint kept: "
    assert said in output
    command = output.split("resume with: ", 1)[1].splitlines()[0]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "covidqu.train"] and f"hydra.run.dir={run}" in words
    assert set(args) <= set(words)  # the same overrides

    ckpt = run / "checkpoints" / "last.ckpt"
    assert loader_position(ckpt) == [{"epoch": 1, "batches": 2}]
    note = (run / "failure.txt").read_text()
    assert "status: interrupted" in note
    assert f"{said}{ckpt}; resume with: {command}" in note

    # The printed command, as this process runs it: auto_resume picks up last.ckpt.
    resumed = [w for w in words[3:] if not w.startswith("hydra.run.dir=")]
    train(compose_config("train", resumed, run))
    assert not (run / "failure.txt").exists()
    assert_same_figures(run, reference)
    assert_same_log(run, reference, resumed_mid_epoch=1)


def test_ctrl_c_mid_epoch_saves_that_moment_and_exits_130(synth_root, tmp_path):
    cfg = compose_config("train", overrides(synth_root, *stop_at(0, 1, send="SIGINT")), tmp_path)
    before = signal.getsignal(signal.SIGINT)  # ignored in a background job of a script
    with pytest.raises(RunInterrupted) as caught:
        train(cfg)
    err = caught.value
    assert err.exit_code == 130
    assert "interrupted by SIGINT at epoch 0, step 2" in str(err)
    assert f"hydra.run.dir={tmp_path}" in str(err)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 2)
    assert loader_position(ckpt) == [{"epoch": 0, "batches": 2}]
    assert "interrupted by SIGINT" in (tmp_path / "failure.txt").read_text()
    assert signal.getsignal(signal.SIGINT) is before  # handed back as it was


def test_resuming_an_older_checkpoint_logs_its_later_steps_once(synth_root, reference, tmp_path):
    """A run killed outright (no SIGTERM first) resumes from a checkpoint older than its log."""
    run = tmp_path / "run"
    copy_shared(reference, run, ignore=shutil.ignore_patterns("epochs"))
    (epoch0,) = (reference / "epochs").glob("epoch=0*.ckpt")
    shutil.copyfile(epoch0, run / "checkpoints" / "last.ckpt")  # killed before epoch 1's own
    train(compose_config("train", overrides(synth_root), run))  # trains epoch 1 again
    assert_same_log(run, reference)
    assert_same_figures(run, reference)


@pytest.mark.parametrize("balanced", [False, True], ids=["shuffle", "balanced"])
def test_train_loader_continues_an_epoch_where_it_stopped(synth_root, balanced):
    def loader(position: dict | None = None):
        dm = LungDataModule(
            root=synth_root, image_size=32, batch_size=2, num_workers=0, seed=3,
            balanced_sampler=balanced,
        )  # fmt: skip
        if position is not None:
            dm.load_state_dict({"train_loader": position})
        return dm.train_dataloader()

    def epoch(dl, number: int) -> list[list[str]]:
        dl.sampler.set_epoch(number)  # as Lightning does before each epoch
        return [list(batch["id"]) for batch in dl]

    fresh = loader()
    first, second = epoch(fresh, 0), epoch(fresh, 1)
    assert first != second and len(first) == STEPS_PER_EPOCH
    assert epoch(loader(), 1) == second  # the order is a function of seed and epoch
    assert fresh.state_dict() == {"epoch": 1, "batches": STEPS_PER_EPOCH}

    resumed = loader({"epoch": 1, "batches": 2})
    assert epoch(resumed, 1) == second[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches": STEPS_PER_EPOCH}
    assert epoch(resumed, 2) == epoch(loader(), 2)  # later epochs in full
    # a position saved at an epoch's end: the next epoch starts from its beginning
    assert epoch(loader({"epoch": 0, "batches": STEPS_PER_EPOCH}), 1) == second


def test_ddp_shards_of_an_epoch_are_disjoint_and_cover_it(synth_root):
    dm = LungDataModule(root=synth_root, image_size=32, num_workers=0)
    dm.setup("fit")
    ds = dm.datasets["train"]
    shards = [list(EpochSampler(ds, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5  # 9 images, one repeated to even them
    assert set(shards[0]) | set(shards[1]) == set(range(len(ds)))


def test_a_process_with_live_loader_workers_exits(synth_root):
    """Workers that outlive group-wide signals must still stop when their parent exits (a worker
    ignoring SIGTERM hangs multiprocessing's clean-up at exit, and so the whole process)."""
    script = f"""
from covidqu.data.datamodule import LungDataModule
dm = LungDataModule(root={str(synth_root)!r}, image_size=32, batch_size=4, num_workers=2,
                    persistent_workers=True, augment=None)
dm.setup("fit")
live = iter(dm.train_dataloader())
next(live)
print("one batch", flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one batch" in proc.stdout
