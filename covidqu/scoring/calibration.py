"""How well scores are calibrated: the expected calibration error (ECE) and the reliability
diagram, for class probabilities and for a binary score read as a probability.

The diagram writes a PNG through matplotlib's Agg canvas on a bare ``Figure``, as
:mod:`covidqu.scoring.plots` does: no display is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

#: Bins of every calibration error and reliability diagram (equal-width confidence bins).
N_BINS = 15


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
    from covidqu.scoring.plots import figure, save

    mean_conf, accuracy, counts = reliability_bins(confidence, correct, n_bins)
    conf = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    weights = counts / max(int(counts.sum()), 1)
    gap = float(np.nansum(weights * np.abs(accuracy - mean_conf)))
    fig = figure()
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
    return save(fig, path)
