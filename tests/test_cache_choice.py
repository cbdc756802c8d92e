"""Which path a run reads: ``data.cache`` null (auto on a GPU), auto, packed or none; a disk
without the room; the size a cache takes on disk; progress in a log file."""

from __future__ import annotations

import errno
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from covidqu.data import packed
from covidqu.data.cache import LogProgress
from covidqu.data.datamodule import LungDataModule
from covidqu.data.layout import DataError, scan
from covidqu.data.packed import PackedReader, packed_bytes

SIZE = 32


def make(root, tmp_path, **kw):
    return LungDataModule(root=root, image_size=SIZE, num_workers=0, cache_dir=tmp_path, **kw)


def npy_files(folder):
    return sorted(p for p in folder.rglob("*.npy"))


def on_gpu(dm):
    """Attach a stand-in Trainer that runs on CUDA devices (what ``trainer=gpu`` builds)."""
    from pytorch_lightning.accelerators import CUDAAccelerator

    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    return dm


def test_the_default_packs_on_a_gpu_and_reads_png_files_on_a_cpu(synth_root, tmp_path):
    cpu = make(synth_root, tmp_path)
    cpu.setup("fit")
    assert (cpu.cache, cpu.normalise) == ("none", "loader")
    assert not npy_files(tmp_path)

    gpu = on_gpu(make(synth_root, tmp_path))
    gpu.prepare_data()
    gpu.setup("fit")
    assert (gpu.cache, gpu.normalise) == ("packed", "device")
    assert isinstance(gpu.reader, PackedReader)
    assert gpu.datasets["train"][0]["image"].dtype == torch.uint8  # normalised on the device


def test_auto_packs_once_and_reuses_it(synth_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = make(synth_root, tmp_path, cache="auto")
    first.prepare_data()
    assert first.cache == "packed"
    assert "about" in caplog.text and "on disk" in caplog.text  # the size before packing
    (manifest,) = tmp_path.rglob("manifest.json")
    built = manifest.stat().st_mtime_ns
    again = make(synth_root, tmp_path, cache="auto")
    again.prepare_data()
    again.setup("fit")
    assert again.cache == "packed" and manifest.stat().st_mtime_ns == built


def no_room(monkeypatch):
    monkeypatch.setattr(packed, "free_bytes", lambda folder: 500)


def test_without_room_auto_reads_png_files_and_packed_refuses(
    synth_root, tmp_path, monkeypatch, caplog
):
    no_room(monkeypatch)
    need = packed_bytes({"train": 9, "val": 9, "test": 9}, SIZE, ["lung"])
    dm = make(synth_root, tmp_path, cache="auto")
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
        dm.setup("fit")
    assert (dm.cache, dm.normalise) == ("none", "loader")
    assert not isinstance(dm.reader, PackedReader)
    assert f"about {packed.human_bytes(need)} on disk" in caplog.text
    assert "500 B free" in caplog.text and "reading the PNG files instead" in caplog.text
    assert not npy_files(tmp_path)

    with pytest.raises(DataError) as caught:
        make(synth_root, tmp_path, cache="packed").prepare_data()
    message = str(caught.value)
    assert "data.cache=packed" in message and "500 B free" in message
    assert "data.cache_dir" in message and "data.cache=none" in message


def test_a_disk_that_fills_while_reserving_leaves_nothing_and_auto_goes_on(
    synth_root, tmp_path, monkeypatch, caplog
):
    """The arrays' space is reserved before any image is decoded; a full disk there is the
    same "no room" as one found before, with no half-built cache left."""

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    dm = make(synth_root, tmp_path, cache="auto")
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    assert dm.cache == "none" and "filled up while packing" in caplog.text
    assert not npy_files(tmp_path) and not list(tmp_path.rglob("manifest.json"))
    with pytest.raises(DataError, match="No space left on device"):
        make(synth_root, tmp_path, cache="packed").prepare_data()


def test_auto_reads_png_files_for_a_capped_run_and_an_unwritable_cache(
    synth_root, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    capped = make(synth_root, tmp_path, cache="auto", limit_per_class=2)
    capped.prepare_data()
    assert capped.cache == "none" and "limit_per_class" in caplog.text
    assert not npy_files(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(packed.tempfile, "mkdtemp", refuse)
    dm = make(synth_root, tmp_path, cache="auto")
    dm.prepare_data()
    assert dm.cache == "none" and "Permission denied" in caplog.text


def test_packed_bytes_is_what_the_arrays_take_on_disk(synth_root, tmp_path):
    index = scan(synth_root, subsets=["infection"])
    result = packed.ensure_packed(index, "infection", SIZE, tmp_path, workers=1)
    on_disk = sum(p.stat().st_size for p in npy_files(result.folder))
    assert packed_bytes(result.counts, SIZE, ["lung", "infection"]) == on_disk


def test_the_lung_subsets_cache_sizes_in_the_readme():
    """The README's figures for the whole dataset are packed_bytes' own."""
    from conftest import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    lung = {"train": 21715, "val": 5417, "test": 6788}
    infection = {"train": 3728, "val": 932, "test": 1166}
    for counts, kinds in ((lung, ["lung"]), (infection, ["lung", "infection"])):
        for side in (256, 512):
            figure = packed.human_bytes(packed_bytes(counts, side, kinds))
            assert figure in readme, (kinds, side, figure)


def test_progress_in_a_log_file_is_a_line_at_every_tenth(caplog):
    caplog.set_level(logging.INFO)
    bar = LogProgress("packing", total=200)
    for _ in range(50):
        bar.update(4)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0] == "packing: 20 of 200 images (10 %)"
    assert lines[-1] == "packing: 200 of 200 images (100 %)"


def test_batches_are_pinned_where_cuda_takes_them(synth_root, tmp_path, monkeypatch):
    """Page-locked batches, which Lightning copies to a CUDA device without blocking."""
    assert not make(synth_root, tmp_path).train_dataloader().pin_memory  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make(synth_root, tmp_path).train_dataloader().pin_memory
    assert make(synth_root, tmp_path).val_dataloader().pin_memory
    assert not make(synth_root, tmp_path, pin_memory=False).train_dataloader().pin_memory
