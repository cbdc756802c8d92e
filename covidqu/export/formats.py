"""The file formats ``export`` writes: ONNX and TorchScript, each with a writer and a loader
that runs the written file, and the metadata document both carry."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidqu.errors import MissingFileError

#: The name of the JSON document that describes the input and output of an exported file.
METADATA_NAME = "covidqu.json"


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    import onnx

    # The torch.export-based exporter (dynamo=True, torch's default since 2.9), not the legacy
    # TorchScript-based one that torch deprecates: torch.export proves the batch dimension
    # symbolic and refuses to export where the network fixes it, where tracing would silently
    # bake in the example's batch size. It runs offline (onnxscript translates the graph).
    # The example batch is 2: torch.export specialises sizes 0 and 1.
    batch = torch.export.Dim("batch")
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # their INFO lines, one per graph pass, would bury the command's own
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on the graph it rewrites
            program = torch.onnx.export(
                net,
                (example,),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_NAME: meta})
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _run_onnx(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})[0]


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    # Traced, not scripted: smp and timm networks hold Python that torch.jit.script rejects,
    # and their forward has no data-dependent branch for a trace to miss. torch deprecates
    # TorchScript, but it is what libtorch (C++) and older serving stacks load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_NAME: meta})


def _run_torchscript(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return loaded(x).numpy()

    return run


#: Each format: its writer (network, example input, file, metadata JSON) and a loader of the
#: written file that runs it on a batch.
EXPORTERS: dict[str, tuple[Callable[..., None], Callable[[Path], Callable[..., np.ndarray]]]] = {
    "onnx": (_export_onnx, _run_onnx),
    "torchscript": (_export_torchscript, _run_torchscript),
}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :func:`metadata` inside an exported file (ONNX or TorchScript)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p} does not exist; give a file written by covidqu.export")
    if p.read_bytes()[:2] == b"PK":  # a TorchScript archive is a zip file
        extra = {METADATA_NAME: ""}
        torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_NAME])
    import onnx

    model = onnx.load(str(p), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    return json.loads(props[METADATA_NAME])
