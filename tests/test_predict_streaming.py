"""``predict`` streams: a few batches in memory whatever the number of files, the same outputs
with loader workers as without, a progress bar on a terminal."""

from __future__ import annotations

import io
import sys
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from covidqu.predict import run as prediction
from covidqu.predict.run import predict
from covidqu.runtime import inputs

from pipeline_helpers import read_csv

BATCH = 2


def _module() -> torch.nn.Module:
    """A small segmentation module whose masks depend on the pixels (a fixed random conv)."""
    from covidqu.models.metrics import SegmentationMetrics
    from covidqu.models.segmentation import SegmentationModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 1))
    return SegmentationModule(
        net=net,
        loss=None,
        metrics=SegmentationMetrics(),
        threshold=0.5,
        recipe={
            "task": {"kind": "segmentation"},
            "preprocess": {"image_size": 32, "mean": 0.449, "std": 0.226},
        },
    ).eval()


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    m = _module()
    monkeypatch.setattr(prediction, "load_model", lambda path, map_location="cpu": m)
    return m


def _images(folder: Path, n: int, broken: tuple[int, ...] = ()) -> list[Path]:
    """``n`` noisy images of varied sizes (so batches mix sizes); ``broken`` ones truncated."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        h, w = 40 + 7 * (i % 3), 48 + 5 * (i % 4)
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (7, 7), 0)
        path = folder / f"cxr_{i:02d}.png"
        cv2.imwrite(str(path), image)
        if i in broken:
            path.write_bytes(path.read_bytes()[:40])
        files.append(path)
    return files


def test_memory_holds_a_few_batches_not_every_file(module, tmp_path, monkeypatch):
    """Count the decoded images alive at each decode: bounded by the batches in flight (here the
    one being filled and the one just written), not by the number of files."""
    files = _images(tmp_path / "in", 4 * BATCH)
    alive: list[weakref.ref] = []
    most = 0
    decode = inputs.read_image

    def counting(path):
        nonlocal most
        image = decode(path)
        alive.append(weakref.ref(image))
        most = max(most, sum(ref() is not None for ref in alive))
        return image

    monkeypatch.setattr(inputs, "read_image", counting)
    rows = predict("model.ckpt", tmp_path / "in", tmp_path / "out", batch_size=BATCH)
    assert len(alive) == len(files)  # each file decoded once (no separate up-front pass)
    assert [r["status"] for r in rows] == ["ok"] * len(files)
    assert most <= 2 * BATCH, f"{most} decoded images alive at once for {len(files)} files"


def test_workers_give_the_same_outputs(module, tmp_path):
    files = _images(tmp_path / "in", 3 * BATCH + 1, broken=(2,))
    got = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        rows = predict("m.ckpt", tmp_path / "in", out, batch_size=BATCH, num_workers=workers)
        assert [r["file"] for r in read_csv(out / "predictions.csv")] == [r["file"] for r in rows]
        masks = {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in out.glob("*.png")}
        got[workers] = (rows, masks)
    rows0, masks0 = got[0]
    rows2, masks2 = got[2]
    assert rows0 == rows2
    assert [Path(r["file"]) for r in rows0] == files  # every input once, in order
    assert rows0[2]["status"].startswith("error:") and "cxr_02.png" in rows0[2]["status"]
    assert sorted(masks0) == sorted(masks2) and len(masks0) == 2 * (len(files) - 1)
    for name, mask in masks0.items():
        assert np.array_equal(mask, masks2[name]), name
    for f in files[:2]:  # each mask at its input's own size, though the batch mixed sizes
        h, w = cv2.imread(str(f), cv2.IMREAD_UNCHANGED).shape
        assert masks0[f"{f.stem}_mask.png"].shape == (h, w)
    assert len({m.shape for n, m in masks0.items() if n.endswith("_mask.png")}) > 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("shown", [True, False])
def test_progress_bar_on_a_terminal(module, tmp_path, monkeypatch, shown):
    _images(tmp_path / "in", 3)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    predict("m.ckpt", tmp_path / "in", tmp_path / "out", batch_size=BATCH, progress_bar=shown)
    text = terminal.getvalue()
    # Not ``text == ""`` when hidden: a warning logged without handlers also lands on stderr.
    assert ("3/3" in text and "predict" in text) == shown, text
