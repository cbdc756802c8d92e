"""Every bad input gets a clear answer: one table of cases, across every command.

Each case runs a command as a user would (its ``main``, with its argument list, in this process:
Hydra composes, checks and reports exactly as from a shell) and must end with a non-zero exit,
no Python traceback, the offending key or file named, and a previous run's folder, where the
case points the command at one, exactly as it was.

A bug found in how covidqu answers bad input gets a row here.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from shared_folders import copy_shared


@dataclass
class World:
    """Files the cases point at, made once."""

    root: Path  # a synthetic COVID-QU-Ex tree
    lung: Path  # a run folder of task=lung (checkpoints, metrics.json, ...)
    classify: Path  # a run folder of task=classify
    tmp: Path  # scratch: a file, an empty folder, broken images, ...
    previous: dict[str, Path] = field(default_factory=dict)  # per command: a folder of results

    def ckpt(self, run: Path) -> Path:
        return run / "checkpoints" / "best.ckpt"


@dataclass(frozen=True)
class Case:
    """``command args`` must fail, naming every string of ``names``.

    ``args`` and ``names`` may hold ``{root}``, ``{lung}``, ``{lung_ckpt}``, ``{classify_ckpt}``,
    ``{classify_last}``, ``{tmp}``, ``{prev}`` (this command's previous results), filled from
    the :class:`World`.
    """

    id: str
    command: str  # train | eval | predict | analyze | report | data
    args: tuple[str, ...]
    names: tuple[str, ...]


CASES: tuple[Case, ...] = (
    # train: config values and choices
    Case("unknown-model", "train", ("model=nonexistent",), ("model", "nonexistent")),
    Case("unknown-key", "train", ("trainer.nonexistent=1",), ("trainer.nonexistent",)),
    Case("key-typo", "train", ("trainer.max_epoch=1",), ("trainer.max_epoch", "+trainer")),
    Case("group-typo", "train", ("model=unett",), ("model/unett", "unetplusplus")),
    Case("override-syntax", "train", ("trainer.devices=[1",), ("[1",)),
    Case("eval-group-typo", "eval", ("trainer=gpuu",), ("trainer/gpuu", "ddp_cpu")),
    Case("lr-not-a-number", "train", ("optimizer.lr=abc",), ("optimizer.lr",)),
    Case("lr-negative", "train", ("optimizer.lr=-0.1",), ("optimizer.lr",)),
    Case("batch-size-zero", "train", ("data.batch_size=0",), ("data.batch_size",)),
    Case("batch-size-text", "train", ("data.batch_size=many",), ("data.batch_size",)),
    Case("image-size-tiny", "train", ("data.image_size=8",), ("data.image_size",)),
    Case("devices-zero", "train", ("trainer.devices=0",), ("trainer.devices",)),
    Case("epochs-fraction", "train", ("trainer.max_epochs=1.5",), ("trainer.max_epochs",)),
    Case("precision-unknown", "train", ("trainer.precision=17",), ("trainer.precision",)),
    Case("gpu-without-gpu", "train", ("trainer=gpu",), ("trainer.accelerator",)),
    Case("task-model-mismatch", "train", ("task=classify", "model=unet"), ("task=classify",)),
    Case(
        "two-wrong-values",
        "train",
        ("optimizer.lr=abc", "data.num_workers=-1"),
        ("optimizer.lr", "data.num_workers"),
    ),
    # train: files and folders
    Case("root-missing", "train", ("data.root={tmp}/missing",), ("{tmp}/missing",)),
    Case("root-empty-folder", "train", ("data.root={tmp}/empty",), ("{tmp}/empty",)),
    Case("root-a-file", "train", ("data.root={tmp}/file.txt",), ("{tmp}/file.txt",)),
    Case(
        "run-dir-under-a-file", "train", ("hydra.run.dir={tmp}/file.txt/run",), ("hydra.run.dir",)
    ),
    Case("weights-missing", "train", ("encoder.weights={tmp}/nope.pth",), ("encoder.weights",)),
    Case("resume-missing", "train", ("ckpt_path={tmp}/nope.ckpt",), ("{tmp}/nope.ckpt",)),
    Case("resume-a-png", "train", ("ckpt_path={tmp}/one_px.png",), ("{tmp}/one_px.png",)),
    Case(
        "resume-another-task",
        "train",
        # last.ckpt, what a resume reads (best.ckpt holds weights only and is refused first)
        ("ckpt_path={classify_last}",),
        ("ckpt_path", "task.name"),
    ),
    Case(
        "run-dir-of-another-task",
        "train",
        ("task=classify", "model=classifier", "hydra.run.dir={lung}"),
        ("{lung}", "auto_resume=false", "hydra.run.dir"),
    ),
    # eval
    Case("eval-no-checkpoint", "eval", (), ("ckpt_path",)),
    Case("eval-checkpoint-missing", "eval", ("ckpt_path={tmp}/nope.ckpt",), ("{tmp}/nope.ckpt",)),
    Case("eval-checkpoint-empty", "eval", ("ckpt_path={tmp}/empty.ckpt",), ("{tmp}/empty.ckpt",)),
    Case("eval-checkpoint-a-png", "eval", ("ckpt_path={tmp}/one_px.png",), ("{tmp}/one_px.png",)),
    Case("eval-split-unknown", "eval", ("ckpt_path={lung_ckpt}", "split=holdout"), ("split",)),
    Case("eval-worst-negative", "eval", ("ckpt_path={lung_ckpt}", "num_worst=-1"), ("num_worst",)),
    Case(
        "eval-root-empty",
        "eval",
        ("ckpt_path={lung_ckpt}", "data.root={tmp}/empty"),
        ("{tmp}/empty",),
    ),
    Case(
        "eval-batch-size",
        "eval",
        ("ckpt_path={lung_ckpt}", "data.batch_size=0"),
        ("data.batch_size",),
    ),
    # predict
    Case("predict-no-input", "predict", ("ckpt_path={lung_ckpt}", "output={prev}"), ("input",)),
    Case(
        "predict-input-missing",
        "predict",
        ("ckpt_path={lung_ckpt}", "input={tmp}/nope.png", "output={prev}"),
        ("{tmp}/nope.png",),
    ),
    Case(
        "predict-one-pixel-image",
        "predict",
        ("ckpt_path={lung_ckpt}", "input={tmp}/one_px.png", "output={prev}"),
        ("{tmp}/one_px.png", "1x1"),
    ),
    Case(
        "predict-empty-image",
        "predict",
        ("ckpt_path={lung_ckpt}", "input={tmp}/empty_mask.png", "output={prev}"),
        ("{tmp}/empty_mask.png",),
    ),
    Case(
        "predict-folder-without-images",
        "predict",
        ("ckpt_path={lung_ckpt}", "input={tmp}/empty", "output={prev}"),
        ("{tmp}/empty",),
    ),
    Case(
        "predict-checkpoint-a-png",
        "predict",
        ("ckpt_path={tmp}/one_px.png", "input={root}", "recursive=true", "output={prev}"),
        ("{tmp}/one_px.png",),
    ),
    Case(
        "predict-batch-size",
        "predict",
        ("ckpt_path={lung_ckpt}", "input={tmp}/one_px.png", "output={prev}", "batch_size=-2"),
        ("batch_size",),
    ),
    # analyze
    Case("analyze-no-checkpoint", "analyze", ("output={prev}",), ("infection_ckpt",)),
    Case(
        "analyze-checkpoint-of-another-task",
        "analyze",
        ("infection_ckpt={lung_ckpt}", "input={tmp}/one_px.png", "output={prev}"),
        ("infection_ckpt", "{lung_ckpt}"),
    ),
    Case(
        "analyze-classifier-as-lung",
        "analyze",
        (
            "lung_ckpt={classify_ckpt}",
            "infection_ckpt={lung_ckpt}",
            "input={tmp}/one_px.png",
            "output={prev}",
        ),
        ("lung_ckpt",),
    ),
    Case(
        "analyze-grade-not-a-number",
        "analyze",
        ("infection_ckpt={lung_ckpt}", "grades.mild=abc", "output={prev}"),
        ("grades.mild",),
    ),
    Case(  # each in 0..100, but not rising: refused before the checkpoints are looked at
        "analyze-grades-not-rising",
        "analyze",
        ("infection_ckpt={lung_ckpt}", "grades.severe=20", "output={prev}"),
        ("grades.severe=20", "grades.moderate=25.0"),
    ),
    Case(
        "analyze-train-split",
        "analyze",
        ("infection_ckpt={lung_ckpt}", "split=train", "output={prev}"),
        ("split",),
    ),
    # report
    Case("report-missing-folder", "report", ("{tmp}/missing",), ("{tmp}/missing",)),
    Case("report-empty-folder", "report", ("{tmp}/empty",), ("{tmp}/empty",)),
    # data
    Case("data-inspect-missing", "data", ("inspect", "{tmp}/missing"), ("{tmp}/missing",)),
    Case("data-inspect-a-file", "data", ("inspect", "{tmp}/file.txt"), ("{tmp}/file.txt",)),
    Case(
        "data-verify-empty-mask",
        "data",
        ("inspect", "--verify", "{tmp}/broken_tree"),
        ("empty_mask_target",),
    ),
    Case("data-synth-over-a-file", "data", ("synth", "{tmp}/file.txt"), ("{tmp}/file.txt",)),
    Case(
        "data-synth-no-images", "data", ("synth", "{tmp}/new", "--per-class", "0"), ("per-class",)
    ),
)


def _fill(text: str, world: World, command: str) -> str:
    return text.format(
        root=world.root,
        lung=world.lung,
        lung_ckpt=world.ckpt(world.lung),
        classify_ckpt=world.ckpt(world.classify),
        classify_last=world.classify / "checkpoints" / "last.ckpt",
        tmp=world.tmp,
        prev=world.previous.get(command, world.tmp / "no-previous"),
    )


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (any write changes
    them; cheaper than hashing the checkpoints before and after each case)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(
    synth_root: Path, module_tmp: Callable[[str], Path], trained_run: Callable[[str], Path]
) -> World:
    base = module_tmp("bad_inputs")
    # copies of the shared runs: failing commands are pointed at these folders
    lung = copy_shared(trained_run("lung"), base / "lung")
    classify = copy_shared(trained_run("classify"), base / "classify")
    tmp = base / "tmp"
    tmp.mkdir()
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("not a folder\n")
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "empty_mask.png").write_bytes(b"")
    cv2.imwrite(str(tmp / "one_px.png"), np.full((1, 1), 128, np.uint8))
    broken = tmp / "broken_tree"
    shutil.copytree(synth_root, broken)
    image = next((broken / "Lung Segmentation Data").rglob("images/*.png"))
    target = image.parent.parent / "lung masks" / image.name
    target.write_bytes(b"")
    target.rename(target.with_name("empty_mask_target.png"))
    image.rename(image.with_name("empty_mask_target.png"))
    world = World(root=synth_root, lung=lung, classify=classify, tmp=tmp)
    # per command, a folder of earlier results the failing command is pointed at
    world.previous = {
        "train": lung,
        "eval": lung,
        "predict": _results(base / "predictions", "predictions.csv"),
        "analyze": _results(base / "analysis", "analysis.csv"),
        "report": tmp,
        "data": tmp,
    }
    return world


def _results(folder: Path, name: str) -> Path:
    folder.mkdir()
    (folder / name).write_text("file,status\nan_earlier.png,ok\n")
    return folder


def run_command(command: str, args: list[str]) -> int:
    """Run ``python -m covidqu.<command> args`` in this process; its exit status."""
    import importlib

    module = importlib.import_module(
        {"data": "covidqu.data.__main__"}.get(command, f"covidqu.{command}")
    )
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = [f"covidqu.{command}", *args]
    try:
        if command in ("report", "data"):
            return int(module.main(args) or 0)
        module.main()  # the entry point itself: Hydra reads sys.argv
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return 0


def _default_run_dir(command: str, world: World) -> list[str]:
    """A Hydra command's run folder, unless the case says. ``train`` and ``eval`` keep their
    results there: they get the previous results' folder itself. ``predict`` and ``analyze``
    keep theirs in ``output=``, which the cases point at the previous results."""
    if command in ("train", "eval"):
        return [f"hydra.run.dir={world.previous[command]}"]
    if command in ("predict", "analyze"):
        return [f"hydra.run.dir={world.tmp}/runs/{command}"]
    return []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_gets_a_clear_error(case: Case, world: World, capfd, monkeypatch):
    monkeypatch.chdir(world.tmp)
    args = [_fill(a, world, case.command) for a in case.args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, *_default_run_dir(case.command, world)]
    if case.command == "train":
        for key, value in (("data.root", world.root), ("encoder.weights", "null")):
            if not any(a.startswith(f"{key}=") for a in args):
                args = [*args, f"{key}={value}"]
    watched = [world.lung, world.classify, world.previous[case.command]]
    before = [_snapshot(f) for f in watched]

    code = run_command(case.command, args)
    out, err = capfd.readouterr()
    text = out + err

    assert code != 0, f"exit 0 for {args}:\n{text[-3000:]}"
    if case.command not in ("report", "data"):  # those two have exit codes of their own
        assert code == 2, f"exit {code}, not 2, for {args}:\n{text[-3000:]}"
        assert "error: " in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for name in case.names:
        assert _fill(name, world, case.command) in text, f"{name!r} not named:\n{text[-3000:]}"
    assert [_snapshot(f) for f in watched] == before, "a previous run's files were changed"


def test_the_table_covers_every_command():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == {"train", "eval", "predict", "analyze", "report", "data"}


def test_a_refused_run_writes_nothing(world: World, tmp_path: Path, capfd):
    """The checks come before Hydra makes the run folder: not even .hydra/ is written."""
    run_dir = tmp_path / "never"
    code = run_command("train", ["optimizer.lr=abc", f"hydra.run.dir={run_dir}"])
    capfd.readouterr()
    assert code == 2
    assert not run_dir.exists()
