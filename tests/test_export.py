"""Exporting a checkpoint to ONNX and TorchScript, through the real entry point.

The exported files must reproduce the checkpoint module's own logits (max absolute difference
at most 1e-4) at batch sizes other than the one exported with, and carry the checkpoint's
preprocessing and class names as metadata; bad arguments get a clear error and write nothing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from covidqu.constants import CLASSES
from covidqu.errors import UserError
from covidqu.export import formats
from covidqu.export import run as export_lib
from covidqu.models.checkpoint import load_module, preprocessing


@pytest.fixture(scope="module")
def checkpoints(trained_run: Callable[[str], Path]) -> dict[str, Path]:
    """A tiny lung model and a tiny classifier (shared, read-only)."""
    return {task: trained_run(task) / "checkpoints" / "best.ckpt" for task in ("lung", "classify")}


def run_export(args: list[str], run_dir: Path) -> int:
    """``python -m covidqu.export ARGS`` in this process (Hydra composes, runs the preflight
    callback and reports errors as from a shell); its exit status."""
    from covidqu import export

    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["covidqu.export", *args, f"hydra.run.dir={run_dir}"]
    try:
        export.main()  # the entry point itself: Hydra reads sys.argv
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return 0


def _onnx_runner(path: Path):
    ort = pytest.importorskip("onnxruntime", reason="format=onnx needs pip install -e '.[export]'")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    meta = session.get_modelmeta().custom_metadata_map
    return (lambda x: session.run(None, {inp.name: x.numpy()})[0]), meta, inp.shape


def _torchscript_runner(path: Path):
    extra = {formats.METADATA_NAME: ""}
    loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    meta = {formats.METADATA_NAME: extra[formats.METADATA_NAME]}

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return loaded(x).numpy()

    return run, meta, None


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("task", ["lung", "classify"])
def test_export_reproduces_the_checkpoint_and_carries_its_preprocessing(
    checkpoints, task, fmt, tmp_path, capfd
):
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(name, reason="format=onnx needs pip install -e '.[export]'")
    ckpt = checkpoints[task]
    output = tmp_path / "served" / f"model.{fmt}"  # its folder does not exist yet
    code = run_export([f"ckpt_path={ckpt}", f"format={fmt}", f"output={output}"], tmp_path / "r")
    assert code == 0, capfd.readouterr().err[-3000:]
    assert output.is_file()
    (tmp_path / "served" / "plain").write_bytes(b"")  # the mode any new file there gets
    assert output.stat().st_mode == (tmp_path / "served" / "plain").stat().st_mode
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name, "plain"]
    if fmt == "torchscript":
        assert zipfile.is_zipfile(output)
    else:
        assert output.read_bytes()[:2] != b"PK"  # an ONNX protobuf, not a TorchScript archive

    run, props, input_shape = (_onnx_runner if fmt == "onnx" else _torchscript_runner)(output)
    module = load_module(ckpt)
    pre = preprocessing(module)
    side = pre["image_size"]
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # neither is the batch size the file was exported with
        x = torch.randn(batch, 1, side, side, generator=gen)
        with torch.inference_mode():
            want = module(x).numpy()
        got = run(x)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4
    if input_shape is not None:  # ONNX declares the batch free and the image size fixed
        assert not isinstance(input_shape[0], int) and input_shape[1:] == [1, side, side]

    meta = json.loads(props[formats.METADATA_NAME])
    assert meta == formats.read_metadata(output)
    assert meta["preprocessing"]["image_size"] == [side, side]
    assert meta["preprocessing"]["mean"] == pytest.approx(pre["mean"])
    assert meta["preprocessing"]["std"] == pytest.approx(pre["std"])
    assert meta["preprocessing"]["target"] == pre["target"]
    assert meta["task"] == task
    assert meta["output"]["kind"] == "logits"
    assert meta["input"]["shape"] == ["batch", 1, side, side]
    if task == "lung":
        assert meta["kind"] == "segmentation"
        assert meta["class_names"] == ["lung"] == list(module.class_names)
        assert meta["output"]["shape"] == ["batch", 1, side, side]
        assert meta["output"]["activation"] == "sigmoid"
        assert meta["output"]["threshold"] == module.threshold
    else:
        assert meta["kind"] == "classification"
        assert meta["class_names"] == list(CLASSES)
        assert meta["output"]["shape"] == ["batch", len(CLASSES)]
        assert meta["output"]["activation"].startswith("softmax")


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["format=torchscript", "output={tmp}/m.pt"], ["ckpt_path", "covidqu.export"]),
        (["ckpt_path={lung}", "format=torchscript"], ["output", "covidqu.export"]),
        (
            ["ckpt_path={lung}", "format=tflite", "output={tmp}/m.tflite"],
            ["format=tflite", "format=onnx", "format=torchscript"],
        ),
        (
            ["ckpt_path={tmp}/nope.ckpt", "format=torchscript", "output={tmp}/m.pt"],
            ["ckpt_path={tmp}/nope.ckpt"],
        ),
        (["ckpt_path={lung}", "format=torchscript", "output={tmp}"], ["output={tmp}"]),
        (
            ["ckpt_path={lung}", "format=torchscript", "output={tmp}/a_file.txt/m.pt"],
            ["output", "a_file.txt"],
        ),
    ],
    ids=[
        "no-checkpoint",
        "no-output",
        "unknown-format",
        "checkpoint-missing",
        "output-a-folder",
        "output-under-a-file",
    ],
)
def test_bad_arguments_get_a_clear_error(checkpoints, args, names, tmp_path, capfd):
    (tmp_path / "a_file.txt").write_text("not a folder\n")
    fill = {"lung": checkpoints["lung"], "tmp": tmp_path}
    code = run_export([a.format(**fill) for a in args], tmp_path / "run")
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    for name in names:
        assert name.format(**fill) in err, f"{name!r} not named:\n{err[-3000:]}"
    assert not (tmp_path / "run").exists()  # refused before Hydra wrote the run folder
    assert not list(tmp_path.glob("m.*"))


def test_onnx_without_its_libraries_says_how_to_install_them(
    checkpoints, tmp_path, capfd, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnx" else real(name, *a),
    )
    output = tmp_path / "m.onnx"
    code = run_export(
        [f"ckpt_path={checkpoints['lung']}", "format=onnx", f"output={output}"], tmp_path / "r"
    )
    err = capfd.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "onnx" in err and "pip install -e '.[export]'" in err
    assert not output.exists()
    # the library refuses it too, for callers without the preflight callback
    with pytest.raises(UserError, match=r"pip install -e '\.\[export\]'"):
        export_lib.export(checkpoints["lung"], output, "onnx")


def test_a_failed_export_leaves_an_earlier_file_as_it_was(checkpoints, tmp_path, monkeypatch):
    output = tmp_path / "m.pt"
    output.write_bytes(b"an earlier export")

    def broken(net, example, path, meta):
        path.write_bytes(b"half a file")
        raise RuntimeError("the exporter failed")

    monkeypatch.setitem(
        formats.EXPORTERS, "torchscript", (broken, formats.EXPORTERS["torchscript"][1])
    )
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_lib.export(checkpoints["lung"], output, "torchscript")
    assert output.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_an_export_that_does_not_reproduce_the_logits_is_refused(checkpoints, tmp_path):
    module = load_module(checkpoints["classify"])

    def off(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module.net(x).numpy() + 1e-3

    with pytest.raises(RuntimeError, match="differ from the checkpoint"):
        export_lib.check_export(module.net, off, 32, 32)
