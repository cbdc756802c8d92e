"""Files a run leaves in its folder: metrics.json, per_image.csv, overlays, failure notes; each
written atomically (:mod:`covidqu.files`): complete, or not at all."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from covidqu.files import DiskFullError, atomic_text, write_atomic
from covidqu.scoring.worst import SIGNIFICANT

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
FAILURE_FILE = "failure.txt"
SKIPPED_FILE = "skipped_files.txt"
#: The Optuna study of an ``hparams_search=optuna`` sweep, in its sweep folder (SQLite).
STUDY_FILE = "optuna.db"
#: What the learning-rate finder of ``tune=lr`` leaves: its suggestion and curve, and its plot.
LR_FIND_FILE = "lr_find.json"
LR_FIND_PLOT = "lr_find.png"


def lr_suggestion(folder: Path) -> float:
    """The learning rate the finder's ``lr_find.json`` in ``folder`` suggests; OSError,
    ValueError, KeyError or TypeError where the file is not there or says none."""
    return float(json.loads((folder / LR_FIND_FILE).read_text())["suggestion"])


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


def headline(metrics: Mapping[str, Any], width: int = 96) -> list[str]:
    """The figures of ``metrics`` (``<stage>/<name>`` numbers) as a few lines of
    ``name value`` pairs, for the terminal; ``metrics.json`` has them all."""
    pairs = [
        f"{key} {value:.4f}"
        for key, value in metrics.items()
        if "/" in key and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    lines: list[str] = []
    for pair in pairs:
        if lines and len(lines[-1]) + 3 + len(pair) <= width:
            lines[-1] += f"   {pair}"
        else:
            lines.append(pair)
    return lines


@rank_zero_only
def write_metrics(out_dir: Path, metrics: Mapping[str, Any]) -> Path:
    """``metrics.json``: a flat object of final figures (NaN written as null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    path = out_dir / METRICS_FILE
    write_atomic(path, json.dumps(clean, indent=2) + "\n")
    return path


@rank_zero_only
def save_config(cfg: DictConfig, out_dir: Path) -> Path:
    """The resolved config, beside Hydra's own (unresolved) copy in ``.hydra/``."""
    path = out_dir / "config.yaml"
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


@rank_zero_only
def clear_failure(out_dir: Path) -> None:
    """Remove the failure note of an earlier attempt of this run (a requeued job, a restart)."""
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)


@rank_zero_only
def write_failure(
    out_dir: Path, err: BaseException, trace: str, duration_s: float | None = None
) -> None:
    """Record why a run failed (or was interrupted: the error's ``status``), next to whatever
    checkpoints and logs it left. Where the note itself cannot be written (the disk that
    stopped the run is full), say so on stderr and go on: the error it would have recorded
    still reaches the terminal, as the command's own message."""
    text = (
        f"status: {getattr(err, 'status', 'failed')}\ntime: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        + (f"duration_s: {duration_s:.1f}\n" if duration_s is not None else "")
        + f"error: {type(err).__name__}: {err}\n\n{trace}"
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / FAILURE_FILE, text)
    except (OSError, DiskFullError) as problem:
        print(f"warning: {out_dir / FAILURE_FILE} could not be written: {problem}", file=sys.stderr)


def skipped_files(datamodule: Any, out_dir: Path) -> dict[str, int]:
    """``{"skipped_files": n}`` for ``metrics.json`` when ``data.on_bad_file=skip`` (else
    ``{}``), and ``skipped_files.txt`` listing them (path, tab, what was wrong).

    A collective under DDP (the files of every process count): every process must call it.
    """
    bad = getattr(datamodule, "bad_files", None)
    if bad is None or bad.policy != "skip":
        return {}
    skipped = datamodule.skipped_files()
    _write_skipped(out_dir, skipped)
    return {"skipped_files": len(skipped)}


@rank_zero_only
def _write_skipped(out_dir: Path, skipped: Mapping[str, str]) -> None:
    path = out_dir / SKIPPED_FILE
    if skipped:
        write_atomic(path, "".join(f"{p}\t{why}\n" for p, why in sorted(skipped.items())))
    else:
        path.unlink(missing_ok=True)


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV with the union of the rows' keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_text(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value: Any) -> Any:
    return f"{value:.{SIGNIFICANT}g}" if isinstance(value, float) else value


@rank_zero_only
def write_test_outputs(module: Any, out_dir: Path) -> None:
    """What a test run leaves: ``per_image.csv``, the module's tables (a classifier's confusion
    matrix) and the overlays it kept, each rendered by the module itself."""
    if module.test_records:
        write_rows(out_dir / PER_IMAGE_FILE, module.test_records)
    for name, rows in module.test_tables().items():
        write_rows(out_dir / f"{name}.csv", rows)
    if module.overlays:
        folder = out_dir / "overlays"
        folder.mkdir(exist_ok=True)
        for item in module.overlays:
            write_png(folder / f"{safe_name(item['id'])}.png", module.render_overlay(item))


def safe_name(name: str) -> str:
    """A file name that keeps spaces and parentheses but no path separators."""
    return name.replace(os.sep, "_").replace("/", "_")


def write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    write_atomic(path, buf.tobytes())
