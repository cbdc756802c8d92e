"""Exporting a checkpoint's network for serving: what ``python -m covidqu.export`` runs.

The exported graph is the network alone: it takes the normalised float32 image, ``B x 1 x H x
W`` at the checkpoint's image size with any batch size ``B``, and returns logits (``B x C x H x
W`` for segmentation, ``B x C`` for classification). Reading, resizing and normalising an image,
and turning logits into probabilities, stay with the caller; what they must do travels inside
the file as one JSON document (:func:`metadata`) under the name ``covidqu.json``: an ONNX
``metadata_props`` entry, or an extra file of the TorchScript archive (see
:mod:`covidqu.export.formats`). A file is never written unless it reproduces the checkpoint's
own logits (:func:`check_export`). A network with two outputs (``task=multitask``) is refused up
front (:mod:`covidqu.export.checks`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidqu.export.checks import (
    check_format,
    check_installed,
    check_output,
    check_required,
    check_single_output,
)
from covidqu.export.formats import EXPORTERS
from covidqu.models.postprocess import apply_config

log = logging.getLogger(__name__)

#: Bumped when the metadata's keys change meaning.
METADATA_VERSION = 1
#: The largest difference of logits an exported file may show from the checkpoint's own.
TOLERANCE = 1e-4


def _size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def metadata(module: Any) -> dict[str, Any]:
    """What a caller of the exported file needs: the input it takes (with the preprocessing
    that makes it), and what its output means (logits, their classes and activation)."""
    from covidqu.models.checkpoint import preprocessing

    pre = preprocessing(module)
    task = dict(module.recipe.get("task") or {})
    h, w = _size(pre["image_size"])
    output = module.export_output(h, w)  # the task's own account of its output
    return {
        "covidqu_metadata_version": METADATA_VERSION,
        "task": task.get("name"),
        "kind": task.get("kind"),
        "class_names": output["class_names"],
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
        # the steps covidqu applies to the thresholded masks (covidqu.models.postprocess): a
        # deployment that reproduces covidqu's masks applies them too
        "postprocess": module.postprocess.as_dict() if hasattr(module, "postprocess") else None,
    }


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
    ckpt_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    fmt: str = "onnx",
    postprocess: Mapping[str, Any] | None = None,
) -> Path:
    """Write the network of ``ckpt_path`` to ``output`` in format ``fmt`` (see the module
    docstring), after checking it; the file is replaced only once the export is checked."""
    from covidqu.models.checkpoint import load_module

    check_format(fmt)
    check_installed(fmt)
    path = check_output(output)
    module = load_module(ckpt_path)
    apply_config(module, postprocess)
    check_single_output(type(module), module.recipe, ckpt_path)
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


def run(cfg: Mapping[str, Any]) -> Path:
    """``export`` with the keys of ``conf/export.yaml``."""
    check_required(cfg)
    return export(cfg["ckpt_path"], cfg["output"], cfg["format"], cfg.get("postprocess"))
