"""Files that go bad during a run: a clean stop naming the file, or ``data.on_bad_file=skip``."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from covidqu.data.badfiles import BadFileError
from covidqu.data.datamodule import LungDataModule
from covidqu.errors import ConfigError, DataError
from covidqu.eval.run import evaluate
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config, read_metrics, run_module

TESTS = Path(__file__).resolve().parent


def break_file(path: Path, how: str) -> None:
    """Make ``path`` unreadable: ``truncate`` (half its bytes), ``empty`` (0 bytes) or
    ``delete``."""
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


class BreakTrainFile(pl.Callback):
    """Breaks one training image that was not in the first batch, once that batch has been
    trained on; writes its path (and, should the run stop, the step it stopped at) to ``note``.
    """

    def __init__(self, note: str, how: str = "truncate") -> None:
        self.note = Path(note)
        self.how = how
        self.record: dict[str, Any] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch != 0 or batch_idx != 0:
            return
        first = set(batch["id"])
        sample = next(s for s in trainer.datamodule.datasets["train"].samples if s.id not in first)
        break_file(sample.image, self.how)
        self._write(path=str(sample.image))

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._write(stopped_at_step=int(trainer.global_step))

    def _write(self, **entries: Any) -> None:
        self.record.update(entries)
        self.note.write_text(json.dumps(self.record))


def train_args(root: Path, note: Path, *extra: str) -> list[str]:
    # 9 training images in batches of 3: every image is read in every epoch.
    return [
        *TINY,
        f"data.root={root}",
        "data.batch_size=3",
        "trainer.max_epochs=2",
        f"+callbacks.break_file._target_={BreakTrainFile.__module__}.BreakTrainFile",
        f"+callbacks.break_file.note={note}",
        *extra,
    ]


def says_how_to_fix(message: str, path: str) -> None:
    assert path in message
    assert re.search(r"not a readable image|empty file|cannot read", message)
    assert "Restore the file" in message and "remove it" in message
    assert "data.on_bad_file=skip" in message


# -- the loader ---------------------------------------------------------------------------------


def val_module(root: Path, policy: str, workers: int = 0) -> LungDataModule:
    dm = LungDataModule(
        root=root, image_size=32, batch_size=3, num_workers=workers, on_bad_file=policy
    )
    dm.setup("validate")
    return dm


def test_skip_leaves_bad_samples_out_and_gives_none_for_an_all_bad_batch(synth_copy, caplog):
    dm = val_module(synth_copy, "skip")
    samples = dm.datasets["val"].samples  # the validation loader keeps this order
    for s in samples[:3]:
        break_file(s.image, "truncate")  # the whole first batch
    break_file(samples[4].mask("lung"), "empty")  # one mask of the second
    broken = {str(s.image) for s in samples[:3]} | {str(samples[4].mask("lung"))}

    with caplog.at_level(logging.WARNING, logger="covidqu.data.badfiles"):
        for _ in range(2):  # two epochs: each file is warned about once
            batches = list(dm.val_dataloader())
            assert len(batches) == 3  # Lightning counts on the loader's length
            assert batches[0] is None
            assert batches[1]["image"].shape[0] == 2
            assert samples[4].id not in batches[1]["id"]
            assert batches[2]["image"].shape[0] == 3
    assert set(dm.skipped_files()) == broken
    for path in broken:
        assert sum(path in r.getMessage() for r in caplog.records) == 1, path
    for s in samples:  # nothing readable at all (an unmounted drive): no point going on
        break_file(s.image, "empty")
    with pytest.raises(BadFileError, match="no file of the val split could be read"):
        list(dm.val_dataloader())


def test_a_bad_file_read_in_a_worker_raises_one_clean_error(synth_copy):
    dm = val_module(synth_copy, "error", workers=2)
    bad = dm.datasets["val"].samples[5].image
    break_file(bad, "empty")
    with pytest.raises(BadFileError) as caught:
        list(dm.val_dataloader())
    says_how_to_fix(str(caught.value), str(bad))
    assert "Traceback" not in str(caught.value)  # not torch's re-raise of the worker's error
    with pytest.raises(ConfigError, match=r"data\.on_bad_file='ignore'"):
        val_module(synth_copy, "ignore")


# -- training and evaluation --------------------------------------------------------------------


def test_training_stops_on_a_file_gone_bad_and_keeps_its_state(synth_copy, tmp_path):
    out, note = tmp_path / "run", tmp_path / "note.json"
    with pytest.raises(DataError) as caught:
        train(compose_config("train", train_args(synth_copy, note), out))
    record = json.loads(note.read_text())
    says_how_to_fix(str(caught.value), record["path"])
    # the file goes bad in the first epoch, before any end-of-epoch checkpoint: this one was
    # saved when the error surfaced
    assert 0 < record["stopped_at_step"] < 3
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == record["stopped_at_step"]
    failure = (out / "failure.txt").read_text()
    assert "BadFileError" in failure and record["path"] in failure


def test_the_command_names_a_file_gone_bad_in_a_worker_without_a_traceback(synth_copy, tmp_path):
    out, note = tmp_path / "run", tmp_path / "note.json"
    args = train_args(
        synth_copy,
        note,
        "+callbacks.break_file.how=empty",
        "data.num_workers=2",
        "data.persistent_workers=false",  # the next epoch's workers read the emptied file
        f"hydra.run.dir={out}",
    )
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    proc = run_module("covidqu.train", args, env={"PYTHONPATH": path})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    says_how_to_fix(errors[0], json.loads(note.read_text())["path"])
    assert "empty file" in errors[0]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "failure.txt").is_file()


def test_batches_with_no_readable_sample_are_skipped(synth_copy, tmp_path):
    probe = val_module(synth_copy, "skip")
    probe.setup("fit")
    train_samples, val_samples = probe.datasets["train"].samples, probe.datasets["val"].samples
    # 2 readable training images in 3 batches of 3: at least one batch has none
    broken = [s.image for s in train_samples[2:]] + [s.image for s in val_samples[:3]]
    for path in broken:
        break_file(path, "empty")
    args = [*TINY, f"data.root={synth_copy}", "data.batch_size=3", "data.on_bad_file=skip"]
    args.append("data.image_size=64")  # at 32 px a batch left with one image breaks batch norm
    out = tmp_path / "run"
    train(compose_config("train", [*args, "trainer.max_epochs=1", "test=false"], out))
    assert read_metrics(out)["skipped_files"] == len(broken)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert 1 <= last["global_step"] <= 2  # the step of the all-bad batch was skipped
    assert (out / "checkpoints" / "best.ckpt").is_file()  # the epoch still ended in validation
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, broken))


def test_skip_trains_on_and_counts_the_file_in_training_and_evaluation(
    synth_copy, tmp_path, caplog
):
    out, note = tmp_path / "run", tmp_path / "note.json"
    args = train_args(synth_copy, note, "data.on_bad_file=skip", "data.num_workers=2")
    with caplog.at_level(logging.WARNING, logger="covidqu.data.badfiles"):
        train(compose_config("train", args, out))
    bad = json.loads(note.read_text())["path"]
    metrics = read_metrics(out)
    assert metrics["skipped_files"] == 1
    assert metrics["epochs"] == 2 and "test/dice" in metrics
    assert (out / "skipped_files.txt").read_text().startswith(f"{bad}\t")
    assert [r.getMessage() for r in caplog.records if bad in r.getMessage()], "no warning"

    ckpt = out / "checkpoints" / "best.ckpt"
    evaluated = tmp_path / "eval"
    eval_args = [f"ckpt_path={ckpt}", f"data.root={synth_copy}", "split=train", "num_overlays=0"]
    eval_args += ["data.num_workers=0", "trainer.accelerator=cpu"]
    metrics = evaluate(compose_config("eval", [*eval_args, "data.on_bad_file=skip"], evaluated))
    assert metrics["skipped_files"] == 1 and metrics["images"] == 8
    assert read_metrics(evaluated)["skipped_files"] == 1
    with pytest.raises(DataError) as caught:
        evaluate(compose_config("eval", eval_args, tmp_path / "eval_error"))
    says_how_to_fix(str(caught.value), bad)
