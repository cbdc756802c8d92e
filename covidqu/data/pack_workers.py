"""What the packing processes run: decode, check and resize a chunk of files straight into
the cache's arrays (:func:`build_arrays`); the files that failed, for the message."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidqu.data.cache import run_chunks
from covidqu.data.layout import Problem, Sample, relative_key
from covidqu.data.readers import ImageDecodeError, read_image, read_mask

#: Samples decoded per task of the process pool (small enough for a smooth progress bar).
CHUNK = 64
#: Fewer samples than this are decoded in this process: starting a pool would cost more.
INLINE_BELOW = 256


def mask_paths(sample: Sample, kinds: Sequence[str]) -> list[Path]:
    """The files of ``sample``'s masks of ``kinds`` (those it has)."""
    return [p for p in (sample.mask(k) for k in kinds) if p is not None]


_TRANSFORMS: dict[tuple[int, int], Any] = {}


def _resize(hw: tuple[int, int]) -> Any:
    """The PNG path's own resize (``build_transform`` without augmentation), once per process."""
    if hw not in _TRANSFORMS:
        from covidqu.data.transforms import build_transform

        _TRANSFORMS[hw] = build_transform(hw)
    return _TRANSFORMS[hw]


def _pack_chunk(
    folder: str, split: str, kinds: tuple[str, ...], hw: tuple[int, int], start: int, files: list
) -> list[Problem]:
    """Decode, check and resize ``files`` (image path, mask paths) into rows ``start...`` of the
    split's arrays, opened for writing in place: no pixels travel back to the parent."""
    images = np.load(Path(folder) / f"{split}.images.npy", mmap_mode="r+")
    masks = [np.load(Path(folder) / f"{split}.{k}.npy", mmap_mode="r+") for k in kinds]
    problems: list[Problem] = []
    for row, (image_path, mask_paths) in enumerate(files, start=start):
        found: list[Problem] = []
        try:
            image = read_image(image_path)
        except ImageDecodeError as err:
            found.append(Problem(Path(image_path), f"unreadable image: {err}"))
            image = None
        decoded = []
        for path in mask_paths:
            try:
                m = read_mask(path)
            except ImageDecodeError as err:
                found.append(Problem(Path(path), f"unreadable mask: {err}"))
                continue
            if image is not None and m.shape != image.shape:
                found.append(
                    Problem(
                        Path(path),
                        f"mask is {m.shape[0]}x{m.shape[1]} but its image is "
                        f"{image.shape[0]}x{image.shape[1]} (height x width)",
                    )
                )
            decoded.append(m)
        if found:
            problems += found
            continue
        out = _resize(hw)(image=image, masks=decoded)
        images[row] = out["image"]
        for arr, m in zip(masks, out["masks"], strict=True):
            arr[row] = m
    images.flush()
    for arr in masks:
        arr.flush()
    return problems


def reserve(path: Path) -> None:
    """Allocate ``path``'s whole size on disk now. A new array file is sparse: without this a
    full disk would show only when a decoded image is written into its pages (a SIGBUS that
    kills the writing process), not as an error here, before any decoding."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:  # a file system without fallocate: space is taken as written
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def build_arrays(
    tmp: Path,
    by_split: dict[str, list[Sample]],
    kinds: tuple[str, ...],
    hw: tuple[int, int],
    base: Path,
    workers: int,
    progress: Callable[[int], None] | None,
) -> list[Problem]:
    """Write every split's arrays into ``tmp``; the problems of the files that failed. Every
    array's space is reserved first: a disk without the room raises ``OSError`` (ENOSPC) here,
    before any file is decoded."""
    tasks = []
    for split, samples in by_split.items():
        n = len(samples)
        for name in ("images", *kinds):
            path = tmp / f"{split}.{name}.npy"
            np.lib.format.open_memmap(path, "w+", np.uint8, (n, *hw)).flush()
            reserve(path)
        np.save(tmp / f"{split}.labels.npy", np.array([s.label for s in samples], np.int64))
        (tmp / f"{split}.ids.json").write_text(json.dumps([relative_key(s) for s in samples]))
        for i in range(0, n, CHUNK):
            files = [
                (str(s.image), [str(p) for p in mask_paths(s, kinds)])
                for s in samples[i : i + CHUNK]
            ]
            tasks.append((str(tmp), split, kinds, hw, i, files))
    total = sum(len(s) for s in by_split.values())
    sizes = [len(t[-1]) for t in tasks]
    done = run_chunks(_pack_chunk, tasks, sizes, workers, total < INLINE_BELOW, progress)
    return [problem for chunk in done for problem in chunk]


def problem_report(subset: str, base: Path, root: Path, problems: list[Problem]) -> str:
    lines = [f"{len(problems)} file(s) of the {subset} subset at {base} could not be packed:"]
    lines += [f"  {p.relative_to(base)['path']}: {p.problem}" for p in problems]
    lines.append(
        f"Nothing was written to the cache. Fix or remove the files named (an image together with "
        f"its masks); `python -m covidqu.data inspect '{root}' --verify` checks every file."
    )
    return "\n".join(lines)
