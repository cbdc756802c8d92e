"""Files a run leaves in its folder: metrics.json, per_image.csv, overlays, failure notes."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from covidqu.constants import CLASSES

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
FAILURE_FILE = "failure.txt"
CONFUSION_FILE = "confusion_matrix.csv"

#: Overlay colours (BGR) of mask values 1, 2, ...: lung green, infection red.
COLOURS = {1: (60, 200, 60), 2: (40, 40, 230)}


def relative(path: str | os.PathLike[str], base: Path) -> str:
    """``path`` relative to ``base`` where it lies inside it, else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


def clean_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats, sorted by key; Lightning's per-step and per-epoch duplicates folded."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = key.removesuffix("_epoch")
        if key.endswith("_step"):
            continue
        out[name] = float(value)
    return dict(sorted(out.items()))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@rank_zero_only
def write_metrics(out_dir: Path, metrics: Mapping[str, Any]) -> Path:
    """``metrics.json``: a flat object of final figures (NaN written as null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    path = out_dir / METRICS_FILE
    _write_atomic(path, json.dumps(clean, indent=2) + "\n")
    return path


@rank_zero_only
def save_config(cfg: DictConfig, out_dir: Path) -> None:
    """The resolved config, beside Hydra's own (unresolved) copy in ``.hydra/``."""
    _write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def clear_failure(out_dir: Path) -> None:
    """Remove the failure note of an earlier attempt of this run (a requeued job, a restart)."""
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)


@rank_zero_only
def write_failure(
    out_dir: Path, err: BaseException, trace: str, duration_s: float | None = None
) -> None:
    """Record why a run failed, next to whatever checkpoints and logs it left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = (
        f"status: failed\ntime: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        + (f"duration_s: {duration_s:.1f}\n" if duration_s is not None else "")
        + f"error: {type(err).__name__}: {err}\n\n{trace}"
    )
    _write_atomic(out_dir / FAILURE_FILE, text)


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV with the union of the rows' keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


@rank_zero_only
def write_test_outputs(
    module: Any, out_dir: Path, mean: float | None = None, std: float | None = None
) -> None:
    """``per_image.csv``, the confusion matrix (classification) and overlays of a test run."""
    if module.test_records:
        write_rows(out_dir / PER_IMAGE_FILE, module.test_records)
    confusion = getattr(module, "confusion", {}).get("test")
    if confusion is not None:
        rows = [
            {"truth": CLASSES[i], **{CLASSES[j]: int(confusion[i, j]) for j in range(len(CLASSES))}}
            for i in range(len(CLASSES))
        ]
        write_rows(out_dir / CONFUSION_FILE, rows)
    if module.overlays:
        pre = module.recipe.get("preprocess", {})
        mean = pre.get("mean", 0.0) if mean is None else mean
        std = pre.get("std", 1.0) if std is None else std
        folder = out_dir / "overlays"
        folder.mkdir(exist_ok=True)
        for item in module.overlays:
            image = denormalise(item["image"].numpy(), mean, std)
            if "target" in item:
                panel = segmentation_panel(
                    image, item["target"].numpy(), item["prediction"].numpy()
                )
            else:
                panel = classification_panel(
                    image, item["label"], item["prediction"], item["probabilities"].tolist()
                )
            write_png(folder / f"{safe_name(item['id'])}.png", panel)


def denormalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A normalised gray image back to uint8."""
    return np.clip((x * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A BGR picture of ``image`` with each mask value tinted and outlined in its colour."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    out = bgr.astype(np.float32)
    for value, colour in COLOURS.items():
        region = mask == value
        if region.any():
            out[region] = (1 - alpha) * out[region] + alpha * np.array(colour, np.float32)
    out = out.astype(np.uint8)
    for value, colour in COLOURS.items():
        region = (mask == value).astype(np.uint8)
        if region.any():
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    h, w = panel.shape[:2]
    bar = np.zeros((max(14, h // 12), w, 3), np.uint8)
    scale = max(0.3, bar.shape[0] / 30)
    cv2.putText(
        bar,
        text,
        (3, bar.shape[0] - 4),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    return np.vstack([bar, panel])


#: Overlays of small model inputs are enlarged to at least this side, to stay readable.
MIN_PANEL_SIDE = 256


def _enlarge(image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
    k = max(1, -(-MIN_PANEL_SIDE // max(image.shape[:2])))
    if k == 1:
        return (image, *masks)
    size = (image.shape[1] * k, image.shape[0] * k)
    big = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return (
        big,
        *(cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for m in masks),
    )


def segmentation_panel(image: np.ndarray, target: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Image | ground truth | prediction, side by side, each captioned."""
    image, target, prediction = _enlarge(image, target, prediction)
    gray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    panels = [
        _caption(gray, "image"),
        _caption(tint(image, target), "truth"),
        _caption(tint(image, prediction), "prediction"),
    ]
    return np.hstack(panels)


def classification_panel(
    image: np.ndarray, label: int | None, prediction: int, probabilities: Sequence[float]
) -> np.ndarray:
    """The image captioned with the predicted class (and the truth, when known)."""
    (image,) = _enlarge(image)
    gray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    text = f"pred {CLASSES[prediction]} {probabilities[prediction]:.2f}"
    if label is not None:
        text = f"true {CLASSES[label]} | {text}"
    return _caption(gray, text)


def safe_name(name: str) -> str:
    """A file name that keeps spaces and parentheses but no path separators."""
    return name.replace(os.sep, "_").replace("/", "_")


def write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())
