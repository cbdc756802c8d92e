"""Calibrated scores: temperature scaling and its sidecar file (the figures that measure
calibration, ECE and the reliability diagram, are :mod:`covidqu.scoring.calibration`'s).

A classifier's softmax is its confidence; a network trained to low loss is usually more sure
than right. ``python -m covidqu.eval ckpt_path=... calibrate=true`` fits one temperature ``T``
on the validation split (the NLL of ``logits / T``; the argmax, so the accuracy, is unchanged)
and keeps it beside the checkpoint in a small JSON *sidecar* (``best.ckpt`` ->
``best.calibration.json``). :func:`covidqu.models.checkpoint.load_module` reads it, so eval,
predict, analyze and ensemble members all apply it.

The sidecar names the checkpoint by a hash of its weights (:func:`weights_fingerprint`): a
retrained checkpoint under the same name does not pick up the old model's temperature (the
stale sidecar is ignored, with a warning), while a copied one keeps it.
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

import torch
import torch.nn.functional as F
from torch import Tensor

from covidqu.errors import CheckpointError
from covidqu.files import write_atomic

log = logging.getLogger(__name__)

#: What a sidecar file's name ends with, in place of the checkpoint's ``.ckpt``.
SIDECAR_SUFFIX = ".calibration.json"


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
    return write_atomic(sidecar_path(ckpt_path), json.dumps(dict(record), indent=2) + "\n")


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
