"""The packed cache: every split of a subset decoded and resized once, into memory-mapped arrays.

Decoding PNGs, not the model, limits training on a GPU node, and every epoch decodes every file
again. ``data.cache=packed`` (or ``python -m covidqu.data pack ROOT``) decodes each image and mask
once, resized exactly as the PNG path resizes them, into ``.npy`` files that
:class:`PackedReader` maps: DataLoader workers and the DDP processes of a node share the same
pages of the OS page cache instead of each holding a copy. A packed batch equals a PNG batch
pixel for pixel.

Layout, one folder per (tree, subset, size) and inside it one folder per state of the tree::

    <cache_dir>/packed/<subset>-<H>x<W>-<hash of the subset folder>.lock
    <cache_dir>/packed/<subset>-<H>x<W>-<hash of the subset folder>/<fingerprint>/
        manifest.json
        <split>.images.npy        uint8 [N, H, W]
        <split>.<mask kind>.npy   uint8 {0, 1} [N, H, W], one per mask kind of the subset
        <split>.labels.npy        int64 [N]
        <split>.ids.json          the images' paths relative to the subset folder, row order

The fingerprint hashes every packed file's relative name, size and modification time (and what
the pixels depend on: size, format, OpenCV and albumentations versions), so a changed tree gets a
new folder and is never read stale. One process builds, under an exclusive ``flock`` on the lock
file, into a temporary folder that is renamed into place once complete; the others wait for the
lock, then find it built. Only numpy and OpenCV load at import: ``pack`` starts quickly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from covidqu.constants import SPLITS, SUBSET_MASKS
from covidqu.data.cache import (
    NoRoomError,
    add_cache_arguments,
    default_cache_dir,
    default_workers,
    file_stamp,
    progress_bar,
)
from covidqu.data.layout import DataError, Index, Problem, Sample, relative_key
from covidqu.data.pack_workers import build_arrays, mask_paths, problem_report
from covidqu.data.readers import no_mask

log = logging.getLogger(__name__)

#: Bumped whenever what is written changes, so older caches are rebuilt, not misread.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PackError(DataError):
    """Files that could not be packed; ``problems`` names each one."""

    def __init__(self, message: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Packed:
    """A packed cache on disk: its ``folder``, whether this call ``built`` it, and its
    image count per split."""

    folder: Path
    built: bool
    counts: dict[str, int]


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    from covidqu.data.transforms import _size  # albumentations: only where pixels are resized

    return _size(size)


def _lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def fingerprint(samples: Sequence[Sample], base: Path, kinds: Sequence[str], size: Any) -> str:
    """A hash of every file the samples are read from (name relative to ``base``, size,
    modification time in ns) and of what the packed pixels depend on besides."""
    h = hashlib.sha256()
    head = {
        "format": FORMAT_VERSION,
        "size": list(_hw(size)),
        "kinds": list(kinds),
        "opencv": cv2.__version__,
        "albumentations": _lib_version("albumentations"),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for s in sorted(samples, key=relative_key):
        for path in (s.image, *mask_paths(s, kinds)):
            h.update(file_stamp(path, base, "while packing", "then pack again"))
    return h.hexdigest()


def packed_bytes(counts: Mapping[str, int], size: Any, kinds: Sequence[str]) -> int:
    """The bytes the arrays of a packed cache take on disk: ``counts`` images per split at
    ``size``, each with its ``kinds`` of masks (one uint8 plane each) and a label (the small
    ``ids.json`` lists aside)."""
    h, w = _hw(size)
    planes = 1 + len(kinds)
    header = 128  # a .npy file's header, as numpy writes these arrays
    return sum(n * (planes * h * w + 8) + (planes + 1) * header for n in counts.values())


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units, as disk sizes are quoted: ``4.4 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # the loop returns at GB


def free_bytes(folder: Path) -> int:
    """The bytes free to this user on the file system that holds ``folder`` (or would)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def cache_folder(
    cache_dir: str | os.PathLike[str], subset_dir: Path, subset: str, size: Any
) -> Path:
    """The folder of the packed caches of one tree's subset at one size."""
    h, w = _hw(size)
    where = hashlib.sha256(str(Path(subset_dir).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "packed" / f"{subset}-{h}x{w}-{where}"


# --------------------------------------------------------------------------- building


@contextlib.contextmanager
def _locked(lock_path: Path, what: str):
    """Hold an exclusive lock on ``lock_path``: one builder, the others wait here."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is packing %s", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path, fp: str) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def ensure_packed(
    index: Index,
    subset: str,
    size: int | Sequence[int],
    cache_dir: str | os.PathLike[str],
    workers: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> Packed:
    """The packed cache of ``subset`` of ``index``'s tree at ``size``, built if absent or stale.

    Every split found is packed whole (a per-class cap picks rows of it later). Safe when
    several processes call it at once: one builds, the others wait and then read. A file that
    fails to decode raises a :class:`PackError` naming every one, and leaves no cache behind;
    so does a disk without the room (:class:`NoRoomError`: checked before packing, and the
    arrays' whole space is reserved before the first image is decoded).
    ``progress``, when given, makes a progress bar when a build starts: ``progress(total=n)``
    returns an object with ``update(k)`` and ``close()``, as ``tqdm`` does.
    """
    index.raise_on_problems(subset)
    base = index.subset_dirs[subset]
    kinds = tuple(SUBSET_MASKS[subset])
    hw = _hw(size)
    by_split = {sp: index.select(subset=subset, split=sp) for sp in SPLITS}
    by_split = {sp: s for sp, s in by_split.items() if s}
    if not by_split:
        raise DataError(f"no images to pack in the {subset} subset at {base}")
    fp = fingerprint([s for v in by_split.values() for s in v], base, kinds, hw)
    home = cache_folder(cache_dir, base, subset, hw)
    target = home / fp[:20]
    counts = {sp: len(s) for sp, s in by_split.items()}
    if _is_complete(target, fp):
        return Packed(target, False, counts)
    what = f"the {subset} subset of {base} at {hw[0]}x{hw[1]}"
    with _locked(home.with_name(home.name + ".lock"), what):
        if _is_complete(target, fp):  # built by the process we waited for
            return Packed(target, False, counts)
        home.mkdir(parents=True, exist_ok=True)
        stale = [p for p in home.iterdir() if p != target]
        for p in stale:  # left by an older state of the tree, or by a killed builder
            if not p.name.startswith(".tmp-"):
                log.warning(
                    "the tree changed since %s was packed into %s: packing it again", what, p
                )
            shutil.rmtree(p, ignore_errors=True)
        if target.exists():  # damaged: no manifest, or another one
            shutil.rmtree(target)
        total, need = sum(counts.values()), packed_bytes(counts, hw, kinds)
        free = free_bytes(home)
        if need > free:
            raise NoRoomError(
                f"packing {what} takes about {human_bytes(need)} on disk, and {home} has "
                f"{human_bytes(free)} free"
            )
        log.info(
            "packing %s (%d images, about %s on disk) into %s, once",
            what,
            total,
            human_bytes(need),
            target,
        )
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=home))
        try:
            n = default_workers(workers)
            bar = progress(total=total) if progress else None
            try:
                problems = build_arrays(
                    tmp, by_split, kinds, hw, base, n, bar.update if bar else None
                )
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise NoRoomError(
                    f"the disk of {home} filled up while packing {what} (about "
                    f"{human_bytes(need)}): {err.strerror or err}"
                ) from err
            finally:
                if bar is not None:
                    bar.close()
            if problems:
                raise PackError(problem_report(subset, base, index.root, problems), problems)
            manifest = {
                "format": FORMAT_VERSION,
                "fingerprint": fp,
                "subset": subset,
                "size": list(hw),
                "masks": list(kinds),
                "root": str(base),
                "counts": counts,
                "build": uuid.uuid4().hex,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                home.rmdir()  # only when empty: a failed first build leaves no folder
    return Packed(target, True, counts)


# --------------------------------------------------------------------------- reading


class PackedReader:
    """Reads samples from a packed cache (a :class:`~covidqu.data.readers.SampleReader`).

    The arrays are memory maps: a worker or process that opens the same folder shares its pages
    with every other. Pickling (DataLoader workers under spawn, DDP processes) carries only the
    folder, and the copy maps the files again; it never carries pixels.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._open()

    def _open(self) -> None:
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise DataError(
                f"no packed cache at {self.folder} ({err}): it was replaced because the tree "
                "changed since this run opened it, or removed. Run again: the cache is rebuilt."
            ) from err
        self.manifest = manifest
        self.subset: str = manifest["subset"]
        self.size: tuple[int, int] = tuple(manifest["size"])
        self.kinds: tuple[str, ...] = tuple(manifest["masks"])
        self.arrays: dict[str, dict[str, np.memmap]] = {}
        self._rows: dict[str, tuple[str, int]] = {}
        for split in manifest["counts"]:
            arrays = {
                name: np.load(self.folder / f"{split}.{name}.npy", mmap_mode="r")
                for name in ("images", *self.kinds, "labels")
            }
            self.arrays[split] = arrays
            ids = json.loads((self.folder / f"{split}.ids.json").read_text())
            self._rows.update((key, (split, row)) for row, key in enumerate(ids))
        # plain ndarray views of the same maps: indexing them skips np.memmap's per-call cost
        self._views = {
            split: {name: np.asarray(a) for name, a in arrays.items()}
            for split, arrays in self.arrays.items()
        }

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = Path(state["folder"])
        self._open()

    def _row(self, sample: Sample) -> tuple[str, int]:
        if sample.subset != self.subset:
            raise DataError(
                f"{sample.image} is from the {sample.subset} subset, but the packed cache at "
                f"{self.folder} holds the {self.subset} subset"
            )
        try:
            return self._rows[relative_key(sample)]
        except KeyError:
            raise DataError(
                f"{sample.image} is not in the packed cache at {self.folder}: the tree changed "
                "since it was packed. Run again (the cache is rebuilt when the tree changes)."
            ) from None

    def image(self, sample: Sample) -> np.ndarray:
        split, row = self._row(sample)
        return self._views[split]["images"][row].copy()

    def mask(self, sample: Sample, kind: str) -> np.ndarray:
        if kind not in self.kinds:
            raise no_mask(sample, kind)
        split, row = self._row(sample)
        return self._views[split][kind][row].copy()


# --------------------------------------------------------------------------- command line

#: ``python -m covidqu.data pack`` exit codes, as ``inspect``'s: packed; a file named could not
#: be packed; ROOT is not a COVID-QU-Ex tree (or lacks the subset asked for, or a bad option).
EXIT_OK, EXIT_PROBLEMS, EXIT_NOT_A_TREE = 0, 1, 2


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ValueError(f"--size {text}: give a side (256) or HEIGHTxWIDTH (256x320)")
    return _hw(parts[0] if len(parts) == 1 else parts)


def add_arguments(parser: Any) -> None:
    """Add the options of ``python -m covidqu.data pack`` to ``parser``."""
    parser.add_argument("root", help="the extracted archive, a subset folder, or its inner folder")
    parser.add_argument(
        "--size", default="256", help="side, or HEIGHTxWIDTH, as data.image_size (default 256)"
    )
    parser.add_argument(
        "--subset",
        choices=("lung", "infection", "both"),
        default=None,
        help="which subset to pack (default: every subset found under ROOT)",
    )
    add_cache_arguments(parser)


def run(args: Any) -> int:
    """Pack what ``args`` ask for and print where; see the exit codes above."""
    import sys

    from covidqu.data.layout import SUBSET_DIRS, NotADatasetError, scan

    def fail(err: Exception, code: int) -> int:
        print(f"error: {err}", file=sys.stderr)
        return code

    try:
        hw = _parse_size(args.size)
        index = scan(args.root)
    except (NotADatasetError, ValueError) as err:
        return fail(err, EXIT_NOT_A_TREE)
    wanted = {None: list(index.subset_dirs), "both": ["lung", "infection"]}.get(
        args.subset, [args.subset]
    )
    missing = [s for s in wanted if s not in index.subset_dirs]
    if missing:
        return fail(
            NotADatasetError(
                f"no '{SUBSET_DIRS[missing[0]]}' under {args.root} (found: "
                f"{', '.join(index.subset_dirs) or 'no subset'}); choose --subset of those found"
            ),
            EXIT_NOT_A_TREE,
        )
    cache_dir = args.cache_dir or default_cache_dir()
    for subset in wanted:
        try:
            packed = ensure_packed(
                index,
                subset,
                hw,
                cache_dir,
                workers=args.workers,
                progress=progress_bar(f"packing {subset}"),
            )
        except DataError as err:  # files that failed to decode, or structural problems
            return fail(err, EXIT_PROBLEMS)
        splits = ", ".join(f"{sp} {n:,}" for sp, n in packed.counts.items())
        done = "packed" if packed.built else "already packed (tree unchanged)"
        print(
            f"{done}: {sum(packed.counts.values()):,} images of the {subset} subset ({splits}) "
            f"at {hw[0]}x{hw[1]} in {packed.folder}"
        )
    return EXIT_OK
