"""Nothing a run wrote is lost to a full disk or a kill: files appear whole or not at all, a
full disk is one clear line, and a resume finds the newest state that loads.

The faults are injected where the bytes are written (``covidqu.files._write_all`` raising
``ENOSPC`` half-way through a file), on a real file system too small for a second checkpoint
(a tmpfs mounted for the test, where the machine lets it be), and by ``kill -9`` of a training
process in the middle of writing ``last.ckpt``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from covidqu import files
from covidqu.errors import CheckpointError
from covidqu.files import DiskFullError, write_atomic
from covidqu.models.checkpoint import read_checkpoint
from covidqu.runtime import outputs
from covidqu.runtime.checkpoint_io import AtomicCheckpointIO
from covidqu.train.checks import check_resume

from pipeline_helpers import CONF, PROJECT_ROOT, TINY, compose_config, read_metrics
from shared_folders import copy_shared


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def half_then_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write stop half-way with ENOSPC, as a disk that fills up does."""

    def write(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_all", write)


# -- files appear whole or not at all -----------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_atomic(path, '{"val/dice": 0.9}\n')
    half_then_full(monkeypatch)
    with pytest.raises(DiskFullError) as err:
        write_atomic(path, '{"val/dice": 0.95, "test/dice": 0.94}\n')
    assert path.read_text() == '{"val/dice": 0.9}\n'  # the good file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no .tmp left
    message = str(err.value)
    assert str(path) in message and "needs about" in message and "free" in message
    assert "paths.output_dir" in message and "hydra.run.dir" in message
    assert err.value.exit_code == 1


def test_every_file_of_a_run_folder_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    """metrics.json, CSV tables, pictures and the CSV log: a full disk leaves each as it was."""
    from covidqu.runtime.loggers import AtomicExperimentWriter

    outputs.write_metrics(tmp_path, {"val/dice": 0.5})
    outputs.write_rows(tmp_path / "per_image.csv", [{"id": "a", "dice": 0.5}])
    writer = AtomicExperimentWriter(log_dir=str(tmp_path / "csv"))
    writer.log_metrics({"train/loss": 1.0}, step=0)
    writer.save()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    half_then_full(monkeypatch)
    with pytest.raises(DiskFullError):
        outputs.write_metrics(tmp_path, {"val/dice": 0.6})
    with pytest.raises(DiskFullError):
        outputs.write_rows(tmp_path / "per_image.csv", [{"id": "a", "dice": 0.6}])
    with pytest.raises(DiskFullError):
        outputs.write_png(tmp_path / "overlay.png", torch.zeros(8, 8, dtype=torch.uint8).numpy())
    writer.log_metrics({"train/loss": 0.5}, step=1)
    with pytest.raises(DiskFullError):
        writer.save()
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_the_csv_log_is_rewritten_whole_with_every_row(tmp_path):
    from covidqu.runtime.loggers import AtomicExperimentWriter

    writer = AtomicExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train/loss": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"train/loss": 0.5, "val/dice": 0.7}, step=1)  # a new column
    writer.save()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "train/loss", "val/dice"]
    assert len(lines) == 3


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_saves_checkpoints_through_the_atomic_writer(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    plugins = [p["_target_"] for p in cfg.trainer.get("plugins") or []]
    assert plugins == ["covidqu.runtime.checkpoint_io.AtomicCheckpointIO"]
    if cfg.trainer.accelerator in ("cpu", "auto"):  # and Lightning's strategy takes it
        from hydra.utils import instantiate

        built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_checkpoint_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    good = sha256(path)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 10)
    with pytest.raises(DiskFullError, match=r"last\.ckpt.*needs about .* 0\.0 MB free"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, path)
    assert sha256(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_failure_note_that_cannot_be_written_still_reaches_the_terminal(
    tmp_path, monkeypatch, capfd
):
    half_then_full(monkeypatch)
    outputs.write_failure(tmp_path, RuntimeError("the real reason"), "", 1.0)  # never raises
    err = capfd.readouterr().err
    assert "failure.txt could not be written" in err and "no space left" in err
    assert not (tmp_path / outputs.FAILURE_FILE).exists()


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.{dead.pid}.tmp"
    live = tmp_path / f".best.ckpt.{os.getppid()}.tmp"
    other = tmp_path / ".notes.tmp"  # not one of ours: left alone
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    assert files.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


# -- resuming from the newest state that loads ---------------------------------------------------


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A writable copy of a tiny finished lung run (best.ckpt of the best epoch, last.ckpt)."""
    return copy_shared(trained_run("lung"), tmp_path / "run")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_last_checkpoint_resumes_from_the_newest_that_loads(run_copy, synth_root, damage):
    ckpts = run_copy / "checkpoints"
    last, best = ckpts / "last.ckpt", ckpts / "best.ckpt"
    earlier = ckpts / "epoch0.ckpt"  # a per-epoch checkpoint: the whole training state
    shutil.copyfile(last, earlier)
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    damaged = last.read_bytes()
    cfg = compose_config("train", [*TINY, f"data.root={synth_root}"], run_copy)
    found = check_resume(cfg, run_copy)
    assert found.path == earlier
    assert found.step == read_checkpoint(earlier)["global_step"]
    line = found.describe()
    assert str(earlier) in line and "last.ckpt" in line
    assert ("the file is empty (0 bytes)" if damage == "empty" else "truncated") in line
    assert f"{best} holds the weights only" in line  # best.ckpt cannot resume training
    assert last.read_bytes() == damaged  # passed over, never deleted or rewritten


def test_the_newest_loadable_checkpoint_wins_by_step(run_copy, synth_root):
    ckpts = run_copy / "checkpoints"
    newer = read_checkpoint(ckpts / "last.ckpt")
    torch.save(newer, ckpts / "epoch1.ckpt")
    newer["global_step"] = 1
    torch.save(newer, ckpts / "epoch0.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"")
    cfg = compose_config("train", [*TINY, f"data.root={synth_root}"], run_copy)
    assert check_resume(cfg, run_copy).path == ckpts / "epoch1.ckpt"  # a higher step than 1


def test_no_checkpoint_that_loads_is_refused_naming_each_with_its_reason(run_copy, synth_root):
    ckpts = run_copy / "checkpoints"
    (ckpts / "last.ckpt").write_bytes(b"")
    (ckpts / "best.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    cfg = compose_config("train", [*TINY, f"data.root={synth_root}"], run_copy)
    with pytest.raises(CheckpointError) as err:
        check_resume(cfg, run_copy)
    text = str(err.value)
    assert "the file is empty (0 bytes)" in text and "best.ckpt" in text and "truncated" in text
    assert "auto_resume=false" in text
    assert {p.name for p in ckpts.iterdir()} >= {"last.ckpt", "best.ckpt"}


# -- a real disk too small for two checkpoints ---------------------------------------------------

#: Run by the tests as ``python -c``: the training command, recording each checkpoint it saves
#: (name and SHA-256) in RECORD, outside the small disk.
RECORDING = textwrap.dedent(
    """
    import hashlib, os, runpy, sys
    from covidqu.runtime.checkpoint_io import AtomicCheckpointIO
    save = AtomicCheckpointIO.save_checkpoint
    def recording(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        with open(os.environ["RECORD"], "a") as fh:
            fh.write(f"{os.path.basename(path)} {digest}\\n")
    AtomicCheckpointIO.save_checkpoint = recording
    sys.argv = ["covidqu.train", *sys.argv[1:]]
    runpy.run_module("covidqu.train", run_name="__main__", alter_sys=True)
    """
)


def train_process(args: list[str], env: dict[str, str], code: str = RECORDING):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full.pop("COVIDQU_ROOT", None)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=PROJECT_ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A tmpfs of its own, remountable at another size; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip() or done}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_disk_with_room_for_one_rewrite_less_keeps_both_and_the_run_resumes(
    small_disk, trained_run, synth_root, tmp_path
):
    ckpts = trained_run("lung") / "checkpoints"
    best, last = ((ckpts / name).stat().st_size for name in ("best.ckpt", "last.ckpt"))
    # room for best.ckpt, last.ckpt, a new best.ckpt beside the old one and the logs, but not
    # for a new last.ckpt beside the old one: the second epoch cannot save its state
    resize(small_disk, best + int(last * 1.5) + 8 * 2**20)
    run = small_disk / "run"
    record = tmp_path / "saved.txt"
    args = [*TINY, f"data.root={synth_root}", "trainer.max_epochs=3", f"hydra.run.dir={run}"]
    proc = train_process(args, {"RECORD": str(record)})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert "no space left on the device writing" in line and "last.ckpt" in line, line
    assert "needs about" in line and "MB free" in line and "hydra.run.dir" in line, line
    assert "best.ckpt (" in line and "last.ckpt (" in line, line  # the checkpoints kept, named
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial
    saved = dict(ln.split() for ln in record.read_text().splitlines())
    assert sha256(ckpts / "last.ckpt") == saved["last.ckpt"]  # byte for byte as written
    assert read_checkpoint(ckpts / "last.ckpt")["epoch"] == 0

    resize(small_disk, 8 * last + 64 * 2**20)  # space was freed: the same command
    proc = train_process(args, {"RECORD": str(record)})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from {ckpts / 'last.ckpt'} (epoch 0" in out, out[-3000:]
    assert read_metrics(run)["epochs"] == 3  # all three, as an uninterrupted run records
    assert read_checkpoint(ckpts / "last.ckpt")["epoch"] == 2


# -- a kill in the middle of writing a checkpoint -----------------------------------------------

#: The training command, slowed inside the second write of last.ckpt (after half its bytes) so
#: that the test can kill it there; PAUSED is created once it waits.
SLOW_SECOND_LAST = RECORDING.replace(
    "AtomicCheckpointIO.save_checkpoint = recording",
    textwrap.dedent(
        """
        AtomicCheckpointIO.save_checkpoint = recording
        import time
        from covidqu import files
        write, seen = files._write_all, []
        def slow(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".last.ckpt."):
                seen.append(fd)
                if len(seen) == 2:
                    os.write(fd, data[: len(data) // 2])
                    open(os.environ["PAUSED"], "w").close()
                    time.sleep(600)
            write(fd, data)
        files._write_all = slow
        """
    ),
)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_kill_mid_write_leaves_the_previous_checkpoint_and_the_run_resumes(synth_root, tmp_path):
    run, paused, record = tmp_path / "run", tmp_path / "paused", tmp_path / "saved.txt"
    args = [*TINY, f"data.root={synth_root}", "trainer.max_epochs=3", f"hydra.run.dir={run}"]
    proc = train_process(args, {"PAUSED": str(paused), "RECORD": str(record)}, SLOW_SECOND_LAST)
    deadline = time.time() + 300
    while not paused.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert paused.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = run / "checkpoints"
    temporaries = [p for p in ckpts.iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0  # the half-written one
    saved = dict(ln.split() for ln in record.read_text().splitlines())
    assert sha256(ckpts / "last.ckpt") == saved["last.ckpt"]  # epoch 0's, whole
    assert read_checkpoint(ckpts / "last.ckpt")["epoch"] == 0

    proc = train_process(args, {"RECORD": str(record)})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "which no longer runs" in out and temporaries[0].name in out
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())
    assert read_metrics(run)["epochs"] == 3
