"""Decoding every file of an index and checking each image with its masks.

Used by ``python -m covidqu.data inspect ROOT --verify``. The structural checks (pairs complete,
folders present) happen while scanning; these are the checks that need the pixels: readable PNG,
image and masks of equal size, binary mask values, empty infection masks outside COVID-19.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from covidqu.constants import CLASSES, COVID
from covidqu.data.layout import DataError, Index, Problem, Sample
from covidqu.data.readers import decode_png


def _check_mask(
    path: Path, shape: tuple[int, ...] | None, problems: list[Problem]
) -> np.ndarray | None:
    """Decode a mask and check its values, and its size against ``shape`` when known."""
    try:
        arr = decode_png(path)
    except DataError as err:
        problems.append(Problem(path, f"unreadable mask: {err}"))
        return None
    if shape is not None and arr.shape[:2] != shape:
        problems.append(
            Problem(
                path, f"mask is {_hw(arr.shape)} but its image is {_hw(shape)} (height x width)"
            )
        )
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
        problems.append(
            Problem(path, f"mask is not binary: values {shown} (expected {{0, 255}} or {{0, 1}})")
        )
    return arr


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def check_sample(sample: Sample) -> list[Problem]:
    """Every pixel-level problem of one sample (an empty list when it is sound)."""
    problems: list[Problem] = []
    try:
        image = decode_png(sample.image)
    except DataError as err:
        problems.append(Problem(sample.image, f"unreadable image: {err}"))
        image = None
    shape = image.shape[:2] if image is not None else None

    masks = [sample.lung_mask] + ([sample.infection_mask] if sample.infection_mask else [])
    decoded = [_check_mask(path, shape, problems) for path in masks]

    infection = decoded[-1] if sample.infection_mask is not None else None
    if infection is not None and sample.label != COVID and np.any(infection):
        problems.append(
            Problem(
                sample.infection_mask,
                f"infection mask of a {CLASSES[sample.label]} image is not empty "
                "(only COVID-19 images carry infection)",
            )
        )
    return problems


def _check_chunk(samples: list[Sample]) -> list[Problem]:
    out: list[Problem] = []
    for s in samples:
        out.extend(check_sample(s))
    return out


def verify(
    index: Index | Iterable[Sample],
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Problem]:
    """Decode every file of ``index`` in ``workers`` processes; return all problems found.

    ``progress(done, total)`` is called as chunks finish.
    """
    samples = list(index)
    total = len(samples)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    chunk = 256
    chunks = [samples[i : i + chunk] for i in range(0, total, chunk)]
    problems: list[Problem] = []
    done = 0
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            problems.extend(_check_chunk(c))
            done += len(c)
            if progress:
                progress(done, total)
        return problems
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for c, found in zip(chunks, pool.map(_check_chunk, chunks), strict=True):
            problems.extend(found)
            done += len(c)
            if progress:
                progress(done, total)
    return problems
