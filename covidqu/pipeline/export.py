"""Exporting a checkpoint's network for serving: what ``python -m covidqu.export`` runs.

The exported graph is the network alone: it takes the normalised float32 image, ``B x 1 x H x
W`` at the checkpoint's image size with any batch size ``B``, and returns logits (``B x C x H x
W`` for segmentation, ``B x C`` for classification). Reading, resizing and normalising an image,
and turning logits into probabilities, stay with the caller; what they must do travels inside
the file as one JSON document (:func:`metadata`) under the name :data:`METADATA_NAME`: an ONNX
``metadata_props`` entry, or an extra file of the TorchScript archive. A file is never written
unless it reproduces the checkpoint's own logits (:func:`check_export`). A network with two
outputs (``task=multitask``) is refused up front (:func:`check_single_output`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidqu.errors import ConfigError, MissingFileError, UserError

log = logging.getLogger(__name__)

#: The name of the JSON document that describes the input and output of an exported file.
METADATA_NAME = "covidqu.json"
#: Bumped when the metadata's keys change meaning.
METADATA_VERSION = 1
#: The largest difference of logits an exported file may show from the checkpoint's own.
TOLERANCE = 1e-4
#: How to install what ``format=onnx`` needs.
INSTALL_EXPORT = "pip install -e '.[export]'"
USAGE = (
    "python -m covidqu.export ckpt_path=RUN/checkpoints/best.ckpt format=onnx|torchscript "
    "output=FILE"
)


def _size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def check_required(cfg: Any) -> None:
    """Refuse a config without ``ckpt_path`` or ``output``, with the command that gives them."""
    for key in ("ckpt_path", "output"):
        if not cfg.get(key):
            raise ConfigError(f"{key} is required: {USAGE}")


def check_format(fmt: Any) -> str:
    """``fmt`` if it is one of :data:`EXPORTERS`; else a :class:`ConfigError` listing them."""
    if fmt not in EXPORTERS:
        raise ConfigError(
            f"format={fmt} is not a known export format; choose "
            + " or ".join(f"format={name}" for name in EXPORTERS)
        )
    return fmt


def check_installed(fmt: str) -> None:
    """Refuse a format whose optional libraries are missing, saying how to install them."""
    if fmt != "onnx":
        return  # TorchScript is part of torch
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(m)]
    if missing:
        raise UserError(
            f"format=onnx needs {', '.join(missing)} (not installed here): run "
            f"{INSTALL_EXPORT} (or choose format=torchscript)"
        )


def check_output(output: Any) -> Path:
    """The file ``output`` names, refused (naming ``output``) where it cannot be written."""
    from covidqu.pipeline.preflight import check_output_dir

    path = Path(str(output)).expanduser()
    if path.is_dir():
        raise ConfigError(f"output={path} is a folder; give a file, e.g. output={path}/model.onnx")
    check_output_dir(path.parent, "output")
    return path


def check_single_output(recipe: dict[str, Any], ckpt_path: Any) -> None:
    """Refuse a network with a classification head (``task=multitask``): its two outputs
    would need a second output name and its own metadata, which the formats here do not
    describe yet; its masks alone come from a task=infection checkpoint."""
    from covidqu.models.multitask import has_class_head

    if has_class_head(recipe):
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds a network with a classification head "
            f"(task={(recipe.get('task') or {}).get('name', 'multitask')}: masks and class "
            "logits), and export writes networks with one output only: export a task=infection "
            "or task=classify checkpoint, or use python -m covidqu.predict with this one"
        )


def metadata(module: Any) -> dict[str, Any]:
    """What a caller of the exported file needs: the input it takes (with the preprocessing
    that makes it), and what its output means (logits, their classes and activation)."""
    from covidqu.constants import CLASSES
    from covidqu.models.checkpoint import preprocessing

    pre = preprocessing(module)
    recipe = module.recipe
    task = dict(recipe.get("task") or {})
    h, w = _size(pre["image_size"])
    segmentation = task.get("kind") == "segmentation"
    names = list(module.class_names if segmentation else recipe.get("classes") or CLASSES)
    output: dict[str, Any] = {
        "name": "logits",
        "kind": "logits",
        "shape": ["batch", len(names), h, w] if segmentation else ["batch", len(names)],
        "activation": "sigmoid" if len(names) == 1 else "softmax over dim 1",
        "class_names": names,
    }
    if segmentation and len(names) == 1:
        output["threshold"] = float(getattr(module, "threshold", 0.5))
    return {
        "covidqu_metadata_version": METADATA_VERSION,
        "task": task.get("name"),
        "kind": task.get("kind"),
        "class_names": names,
        "preprocessing": {
            "image_size": [h, w],
            "mean": float(pre["mean"]),
            "std": float(pre["std"]),
            "target": pre.get("target"),
            "subset": pre.get("subset"),
            "in_channels": int(pre.get("in_channels", 1)),
        },
        "input": {
            "name": "image",
            "shape": ["batch", 1, h, w],
            "dtype": "float32",
            "how": (
                f"an 8-bit gray image resized to {h} x {w} (height x width; OpenCV area "
                "interpolation when shrinking, bilinear when enlarging), then "
                "(pixel / 255 - mean) / std"
            ),
        },
        "output": output,
    }


# -- the formats ---------------------------------------------------------------------------------


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


def check_export(net: torch.nn.Module, run: Callable[[torch.Tensor], np.ndarray], h: int, w: int):
    """Refuse an exported graph whose logits differ from ``net``'s by more than
    :data:`TOLERANCE`, at batch sizes 1 and 3 (neither is the example's: the batch is free)."""
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 1, h, w, generator=gen)
        with torch.inference_mode():
            want = net(x).numpy()
        got = run(x)
        if got.shape != want.shape:
            raise RuntimeError(f"the export returned {got.shape} for {tuple(want.shape)} logits")
        diff = float(np.abs(got - want).max())
        if diff > TOLERANCE:
            raise RuntimeError(
                f"the export's logits differ from the checkpoint's by {diff:.3g} at batch "
                f"size {batch} (more than {TOLERANCE})"
            )
        log.info("batch size %d: logits within %.2g of the checkpoint's", batch, diff)


def export(
    ckpt_path: str | os.PathLike[str], output: str | os.PathLike[str], fmt: str = "onnx"
) -> Path:
    """Write the network of ``ckpt_path`` to ``output`` in format ``fmt`` (see the module
    docstring), after checking it; the file is replaced only once the export is checked."""
    from covidqu.models.checkpoint import load_module

    check_format(fmt)
    check_installed(fmt)
    path = check_output(output)
    module = load_module(ckpt_path)
    check_single_output(module.recipe, ckpt_path)
    meta = metadata(module)
    h, w = meta["preprocessing"]["image_size"]
    # The network alone: the LightningModule's forward adds only a memory-format choice.
    net = module.net.eval()
    write, load = EXPORTERS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and renamed: a failed export leaves an earlier file as it was.
    # (Not tempfile.mkstemp: its file is private to the owner, and the rename would keep that.)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(net, torch.zeros(2, 1, h, w), tmp, json.dumps(meta))
        check_export(net, load(tmp), h, w)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%s, %s x %s input, any batch size)", path, fmt, h, w)
    return path
