"""Synthetic chest X-rays in the COVID-QU-Ex layout, for tests, demos and first runs.

The real archive is large and not always at hand; tests and a first training run still need data
with the same folder layout, file names, PNG formats and the same kind of signal. This module
draws CXR-like images from a seed: a bright body on a dark background, two darker lung fields
(the lung mask is exactly these fields), spine, mediastinum, heart, clavicles and ribs, vessel
markings, blur, noise and exposure jitter. Each class has its own pattern:

* COVID-19: several soft, patchy, ground-glass opacities in both lungs, mostly peripheral and
  lower; the infection mask is where the opacity is strong, inside the lung. The infected share
  of the lung varies from about 5% to 50%.
* Non-COVID: one dense lobar consolidation, many small nodules, or a reticular (interstitial)
  net; the infection mask is empty.
* Normal: clear lungs; the infection mask is empty.

Everything scales with the image size, so 32 px images still show lungs and infection.
Every image is a pure function of ``(seed, class, number, size)``: the same arguments give
byte-identical files, and one image is written into both subsets under the same name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from covidqu.constants import CLASSES, SPLITS, SUBSETS
from covidqu.data.layout import (
    IMAGES_DIR,
    INFECTION_MASKS_DIR,
    LUNG_MASKS_DIR,
    MASK_DIRS,
    SPLIT_DIRS,
    SUBSET_DIRS,
)
from covidqu.data.phantom import (
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    SyntheticCXR,
    check_int,
    synthesize,
)

__all__ = [
    "DEFAULT_PER_CLASS",
    "DEFAULT_SIZE",
    "FILE_NAMES",
    "MARKER",
    "SyntheticCXR",
    "add_arguments",
    "ensure_synthetic",
    "file_name",
    "generate",
    "run",
    "synthesize",
]

#: Bumped whenever the pictures change, so cached trees of an older generator are redrawn.
GENERATOR_VERSION = 1
DEFAULT_PER_CLASS = 10
#: Marker file written into a tree made by :func:`ensure_synthetic` once it is complete.
MARKER = ".complete"
#: Temporary folders of :func:`ensure_synthetic` older than this (seconds) are left-overs of a
#: killed process and are removed.
STALE_AFTER_S = 6 * 3600
#: File-name pattern of each class, as in the real archive.
FILE_NAMES: dict[str, str] = {
    "COVID-19": "covid_{n}.png",
    "Non-COVID": "non_COVID ({n}).png",
    "Normal": "Normal ({n}).png",
}


# --------------------------------------------------------------------------- argument checks


def _check_subsets(subsets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(subsets, str):
        subsets = (subsets,)
    chosen = tuple(subsets)
    if not chosen:
        raise ValueError(f"subsets must name at least one of {SUBSETS}")
    for subset in chosen:
        if subset not in SUBSETS:
            raise ValueError(f"unknown subset {subset!r} in subsets; expected some of {SUBSETS}")
    return tuple(s for s in SUBSETS if s in chosen)


def _check_args(per_class: object, size: object, seed: object) -> tuple[int, int, int]:
    return (
        check_int("--per-class", per_class, 1),
        check_int("--size", size, MIN_SIZE, MAX_SIZE),
        check_int("--seed", seed, 0),
    )


def file_name(cls: str, n: int) -> str:
    """The file name the real archive would give image number ``n`` of class ``cls``."""
    return FILE_NAMES[cls].format(n=n)


# --------------------------------------------------------------------------- the tree


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit array.

    Encoding once and writing bytes (rather than ``cv2.imwrite`` per file) gives both subsets the
    very same bytes, works for any path, and raises ``OSError`` on a failed write where
    ``cv2.imwrite`` would only return ``False``.
    """
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def generate(
    out: str | os.PathLike,
    per_class: int = DEFAULT_PER_CLASS,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    subsets: Sequence[str] = ("lung", "infection"),
    overwrite: bool = False,
) -> Path:
    """Write a COVID-QU-Ex shaped tree of synthetic CXRs under ``out`` and return ``out``.

    Each subset gets ``per_class`` images per split and class, named as in the real archive and
    numbered 1..3*per_class per class across Train, Val and Test; the same name is the same image
    (and lung mask) in both subsets. Refuses to write into a subset folder that already exists,
    so a tree never mixes files of two runs, unless ``overwrite`` replaces it.
    """
    per_class, size, seed = _check_args(per_class, size, seed)
    chosen = _check_subsets(subsets)
    root = Path(out).expanduser()
    for subset in chosen:
        existing = root / SUBSET_DIRS[subset]
        if existing.exists() and overwrite:
            shutil.rmtree(existing)
        elif existing.exists():
            raise FileExistsError(
                f"{existing} already exists; remove it, choose another output folder, "
                "or pass --force to replace it"
            )

    for class_index, cls in enumerate(CLASSES):
        for split_index, split in enumerate(SPLITS):
            for i in range(per_class):
                n = split_index * per_class + i + 1
                sample = synthesize(cls, n, size, seed)
                files = {
                    IMAGES_DIR: _png(sample.image),
                    LUNG_MASKS_DIR: _png(sample.lung_mask),
                    INFECTION_MASKS_DIR: _png(sample.infection_mask),
                }
                for subset in chosen:
                    folder = _class_dir(root, subset, split, class_index)
                    for sub in (IMAGES_DIR, *MASK_DIRS[subset]):
                        (folder / sub).mkdir(parents=True, exist_ok=True)
                        (folder / sub / file_name(cls, n)).write_bytes(files[sub])
    return root


def _class_dir(root: Path, subset: str, split: str, class_index: int) -> Path:
    name = SUBSET_DIRS[subset]
    return root / name / name / SPLIT_DIRS[split] / CLASSES[class_index]


# --------------------------------------------------------------------------- cached sample


def _marker_params(per_class: int, size: int, seed: int) -> dict[str, int]:
    return {"version": GENERATOR_VERSION, "per_class": per_class, "size": size, "seed": seed}


def _is_complete(tree: Path, params: dict[str, int]) -> bool:
    try:
        return json.loads((tree / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def ensure_synthetic(
    cache_dir: str | os.PathLike,
    per_class: int = DEFAULT_PER_CLASS,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Return a complete synthetic tree under ``cache_dir``, generating it the first time only.

    The tree is ``cache_dir/synthetic-<per_class>x<size>-s<seed>-v<generator version>``. It is
    drawn into a temporary sibling folder, marked complete (``.complete``, the parameters as
    JSON), then renamed into place, so processes racing for it (the ranks of a DDP job) never
    read a half-written tree: the first rename wins and the others use its tree and delete their
    own.
    """
    per_class, size, seed = _check_args(per_class, size, seed)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / f"synthetic-{per_class}x{size}-s{seed}-v{GENERATOR_VERSION}"
    params = _marker_params(per_class, size, seed)
    if _is_complete(tree, params):
        return tree
    _remove_stale(cache, tree.name)
    if tree.exists() and not _is_complete(tree, params):  # damaged by hand: draw it again
        _remove_aside(tree)

    tmp = Path(tempfile.mkdtemp(prefix=f".{tree.name}.tmp-", dir=cache))
    try:
        generate(tmp, per_class=per_class, size=size, seed=seed)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        try:
            os.rename(tmp, tree)
        except OSError:
            if not _is_complete(tree, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def _remove_stale(cache: Path, name: str) -> None:
    """Delete temporary folders for ``name`` that a killed process left behind long ago."""
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in cache.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_AFTER_S:
                    shutil.rmtree(path, ignore_errors=True)


def _remove_aside(tree: Path) -> None:
    """Rename ``tree`` out of the way, then delete it; another process may be doing the same."""
    aside = Path(tempfile.mkdtemp(prefix=f".{tree.name}.old-", dir=tree.parent))
    with contextlib.suppress(FileNotFoundError):
        os.rename(tree, aside / tree.name)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m covidqu.data synth`` to ``parser``."""
    parser.add_argument("out", type=Path, help="folder to write the synthetic tree into")
    parser.add_argument(
        "--per-class",
        type=int,
        default=DEFAULT_PER_CLASS,
        help=f"images per split and class in each subset (default {DEFAULT_PER_CLASS})",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"image side in pixels (default {DEFAULT_SIZE})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--force", action="store_true", help="replace subset folders that already exist in OUT"
    )


def run(args: argparse.Namespace) -> int:
    """Generate the tree ``args`` describe and print where it went; 0 on success, 2 on bad input."""
    try:
        out = generate(
            args.out,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            overwrite=args.force,
        )
    except (ValueError, OSError) as err:  # a bad count, or OUT taken or not writable
        print(f"synth: error: {err}", file=sys.stderr)
        return 2
    images = args.per_class * len(SPLITS) * len(CLASSES)
    print(
        f"wrote {images} synthetic {args.size}x{args.size} images (seed {args.seed}) "
        f"with masks into both subsets of {out}"
    )
    return 0
