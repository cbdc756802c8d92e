"""Calibrated scores: expected calibration error, temperature scaling and its sidecar file.

A classifier's softmax is its confidence; a network trained to low loss is usually more sure
than right. ``python -m covidqu.eval ckpt_path=... calibrate=true`` fits one temperature ``T``
on the validation split (the NLL of ``logits / T``; the argmax, so the accuracy, is unchanged)
and keeps it beside the checkpoint in a small JSON *sidecar* (``best.ckpt`` ->
``best.calibration.json``). :func:`covidqu.models.checkpoint.load_module` reads it, so eval,
predict, analyze and ensemble members all apply it.

The sidecar names the checkpoint by a hash of its weights (:func:`weights_fingerprint`): a
retrained checkpoint under the same name does not pick up the old model's temperature (the
stale sidecar is ignored, with a warning), while a copied one keeps it.

The plots write PNG files through matplotlib's Agg canvas on a bare ``Figure``, as
:mod:`covidqu.analysis.scoring` does: no display is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

from covidqu.errors import CheckpointError

log = logging.getLogger(__name__)

#: Bins of every calibration error and reliability diagram (equal-width confidence bins).
N_BINS = 15
#: What a sidecar file's name ends with, in place of the checkpoint's ``.ckpt``.
SIDECAR_SUFFIX = ".calibration.json"


def ece(probabilities: Tensor, target: Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error (l1) of class probabilities B x C against int targets B:
    the count-weighted mean gap between each confidence bin's mean top probability and its
    accuracy (torchmetrics' ``MulticlassCalibrationError``)."""
    value = multiclass_calibration_error(
        probabilities.float(), target.long(), probabilities.shape[1], n_bins=n_bins, norm="l1"
    )
    return float(value)


def binary_ece(scores: Any, truth: Any, n_bins: int = N_BINS) -> float:
    """Expected calibration error (l1) of probabilities of the positive class (in [0, 1])
    against 0/1 truths: each bin's mean probability against its share of positives."""
    p = torch.as_tensor(np.asarray(scores, dtype=float)).float().clamp(0.0, 1.0)
    t = torch.as_tensor(np.asarray(truth, dtype=int)).long()
    return float(binary_calibration_error(p, t, n_bins=n_bins, norm="l1"))


def nll(logits: Tensor, target: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``target`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits.double() / temperature, target.long()))


def fit_temperature(logits: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on ``target``.

    LBFGS on ``log T`` keeps ``T`` positive without a constraint. It starts from ``T = 1``;
    should the optimiser end worse than that start (it cannot with the line search, but a
    float64 NLL is the guarantee the caller is promised), ``T = 1`` is kept.
    """
    z, y = logits.detach().double().clone(), target.detach().long().clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or nll(z, y, temperature) > nll(z, y, 1.0):
        return 1.0
    return temperature


# -- the sidecar ------------------------------------------------------------------------------


def sidecar_path(ckpt_path: str | os.PathLike[str]) -> Path:
    """Where the temperature of ``ckpt_path`` is kept (``best.ckpt``:
    ``best.calibration.json``)."""
    p = Path(ckpt_path).expanduser()
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def weights_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """A SHA-256 of a state dict's names, dtypes, shapes and bytes: what identifies the model a
    temperature was fitted to (the file's size and time would change with a mere copy)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, Tensor):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_sidecar(ckpt_path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write the calibration ``record`` (``temperature``, ``fingerprint``, ...) beside the
    checkpoint, atomically (DDP processes each fit the same value and may write it together)."""
    path = sidecar_path(ckpt_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(record), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_temperature(
    ckpt_path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], key: str = "ckpt_path"
) -> float:
    """The temperature of the checkpoint at ``ckpt_path`` (weights ``state_dict``): its
    sidecar's, or 1 where it has none or the sidecar was fitted to other weights (a stale one,
    ignored with a warning). A sidecar that cannot be read is refused, naming it."""
    path = sidecar_path(ckpt_path)
    if not path.is_file():
        return 1.0
    refit = f"delete it, or fit it again: python -m covidqu.eval {key}={ckpt_path} calibrate=true"
    try:
        record = json.loads(path.read_text())
        temperature = float(record["temperature"])
        fingerprint = str(record["fingerprint"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path} (the calibration of {key}={ckpt_path}) cannot be read ({err}); {refit}"
        ) from err
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(
            f"{path} (the calibration of {key}={ckpt_path}) holds temperature={temperature}, "
            f"not a number > 0; {refit}"
        )
    if fingerprint != weights_fingerprint(state_dict):
        log.warning(
            "ignoring %s: it was fitted to other weights than those now in %s=%s (retrained?); %s",
            path,
            key,
            ckpt_path,
            refit,
        )
        return 1.0
    return temperature


# -- reliability diagram ----------------------------------------------------------------------


def reliability_bins(
    confidence: Any, correct: Any, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of ``confidence`` (in [0, 1]): the mean confidence, the share of
    ``correct`` (accuracy, or for a binary score the share of positives) and the count; NaN
    for an empty bin. The bins are torchmetrics' (a value on an edge falls in the lower bin)."""
    conf = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    hit = np.asarray(correct, dtype=float)
    index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=hit, minlength=n_bins) / counts
    return mean_conf, accuracy, counts


def plot_reliability(
    confidence: Any,
    correct: Any,
    path: str | os.PathLike[str],
    title: str = "reliability",
    xlabel: str = "confidence (top class probability)",
    ylabel: str = "accuracy",
    n_bins: int = N_BINS,
) -> Path:
    """Write a reliability diagram as a PNG at ``path``: each bin's accuracy against its mean
    confidence (bars over the bin, the diagonal for perfect calibration), each bar labelled
    with its count, and the ECE in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean_conf, accuracy, counts = reliability_bins(confidence, correct, n_bins)
    conf = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    weights = counts / max(int(counts.sum()), 1)
    gap = float(np.nansum(weights * np.abs(accuracy - mean_conf)))
    fig = Figure(figsize=(5.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    filled = counts > 0
    bars = ax.bar(
        edges[:-1][filled],
        accuracy[filled],
        width=1.0 / n_bins,
        align="edge",
        edgecolor="black",
        label="accuracy per bin",
    )
    ax.bar_label(bars, labels=[str(int(c)) for c in counts[filled]], fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot(mean_conf[filled], accuracy[filled], "o", color="C3", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: ECE {gap:.3f} over {conf.size} images (counts above the bars)")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
