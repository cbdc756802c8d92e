"""Near-duplicate images: a perceptual hash of every image, and the pairs whose hashes are close.

A near-duplicate in Train and another in Test (the same CXR re-encoded, resized or slightly
cropped) lets a model be scored on an image it trained on. ``python -m covidqu.data duplicates
ROOT`` lists such pairs split by split; ``data.num_folds`` keeps each connected group of them in
one fold (:mod:`covidqu.data.folds`).

The hash is a 256-bit DCT pHash of the gray image: the signs of the 16x16 lowest frequencies of
its 64x64 thumbnail against their median. The usual 64-bit pHash (8x8 of 32x32) is too coarse for
CXRs, which all share one layout: on the real infection Train/Val splits it put different patients
at distance 0. Ours, in a few lines of OpenCV, rather than ``imagehash``: that one reads through
PIL and adds PIL, SciPy and PyWavelets at import, while our images are decoded arrays already
(:func:`~covidqu.data.readers.read_image`). Pairs are found by XOR and popcount of one block of
hashes against all later ones at a time: the 39,746 images of the full dataset (both subsets) are
about 790 million comparisons of four 64-bit words, vectorised numpy with no Python loop over
pairs.

Hashes are cached under ``<cache_dir>/phash/``, one file per subset folder, keyed by a fingerprint
of every image's name, size and modification time (as the packed cache is): a k-fold run reads
them back instead of decoding the subset again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from covidqu.constants import SPLITS, SUBSETS
from covidqu.data.cache import (
    add_cache_arguments,
    default_cache_dir,
    default_workers,
    file_stamp,
    progress_bar,
    run_chunks,
)
from covidqu.data.layout import SPLIT_DIRS, DataError, Index, Sample, relative_key
from covidqu.data.readers import ImageDecodeError, read_image
from covidqu.errors import UserError

#: Bits of the hash, and the side of the block of lowest DCT frequencies they come from.
HASH_BITS, _LOW = 256, 16
#: Hamming distance (of 256 bits) up to which two images are near-duplicates. On the real infection
#: Train/Val splits, pairs up to ~50 are the same radiograph (re-encoded, re-windowed, cropped or
#: shifted a little); counts are few and flat up to 52, then rise steeply, and from ~60 on pairs are
#: different patients with similar framing.
DEFAULT_MAX_DISTANCE = 52
#: Bumped when the hash changes, so older caches are recomputed, not misread.
HASH_VERSION = 2
#: Images decoded per task of the process pool, and below how many the pool is not worth starting.
CHUNK = 128
INLINE_BELOW = 512
#: Rows of hashes compared against all later ones at once (~80 MB of uint64 for the full dataset).
BLOCK = 64


def phash(image: np.ndarray) -> np.ndarray:
    """The 256-bit DCT perceptual hash of a 2-D gray image, as 4 uint64 words."""
    side = 4 * _LOW
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:_LOW, :_LOW]
    bits = (low > np.median(low)).ravel()
    return np.packbits(bits).view(np.uint64)


def _hash_chunk(paths: list[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The hashes of ``paths`` (zeros for a file that failed) and the files that failed, why."""
    hashes = np.zeros((len(paths), HASH_BITS // 64), np.uint64)
    failed = []
    for row, path in enumerate(paths):
        try:
            hashes[row] = phash(read_image(path))
        except ImageDecodeError as err:
            failed.append((path, str(err)))
    return hashes, failed


def hash_files(
    paths: Sequence[str | os.PathLike[str]],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The pHash of each file, in order (uint64 ``[n, 4]``), decoded in a process pool.

    Raises a :class:`DataError` naming every file that could not be decoded.
    """
    files = [str(p) for p in paths]
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    results = run_chunks(
        _hash_chunk,
        [(chunk,) for chunk in chunks],
        [len(chunk) for chunk in chunks],
        default_workers(workers),
        len(files) < INLINE_BELOW,
        progress,
    )
    failed = [f for _, fs in results for f in fs]
    if failed:
        lines = [f"{len(failed)} image(s) could not be decoded to hash them:"]
        lines += [f"  {why}" for _, why in failed[:50]]
        lines.append("Fix or remove the files named (an image together with its masks).")
        raise DataError("\n".join(lines))
    if not results:
        return np.zeros((0, HASH_BITS // 64), np.uint64)
    return np.concatenate([hs for hs, _ in results])


def _fingerprint(samples: Sequence[Sample], base: Path) -> str:
    h = hashlib.sha256(f"phash{HASH_VERSION}\0{cv2.__version__}\n".encode())
    for s in sorted(samples, key=relative_key):
        h.update(file_stamp(s.image, base, "to hash it"))
    return h.hexdigest()


def _cache_file(cache_dir: str | os.PathLike[str], base: Path, subset: str) -> Path:
    where = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "phash" / f"{subset}-{where}.npz"


def subset_hashes(
    index: Index,
    subset: str,
    samples: Sequence[Sample],
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> np.ndarray:
    """The hashes of ``samples`` (of ``subset`` of ``index``'s tree), in their order.

    Every image of the subset is hashed and cached together, so the command and a k-fold run of
    any split share one cache file; it is recomputed when any image of the subset changed.
    ``progress(total=n)`` makes a bar (as ``tqdm`` does) when hashing starts.
    """
    base = index.subset_dirs[subset]
    everything = index.select(subset=subset)
    fp = _fingerprint(everything, base)
    path = None if cache_dir is None else _cache_file(cache_dir, base, subset)
    table: dict[str, np.ndarray] | None = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as saved:
                if str(saved["fingerprint"]) == fp:
                    table = dict(zip(saved["keys"].tolist(), saved["hashes"], strict=True))
        except (OSError, ValueError, KeyError):
            table = None  # unreadable or older: recomputed below
    if table is None:
        bar = progress(total=len(everything)) if progress else None
        try:
            hashes = hash_files([s.image for s in everything], workers, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        keys = [relative_key(s) for s in everything]
        table = dict(zip(keys, hashes, strict=True))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            with open(tmp, "wb") as fh:
                np.savez(fh, fingerprint=np.array(fp), keys=np.array(keys), hashes=hashes)
            os.replace(tmp, path)  # whole or not at all, for a reader in another process
    if not samples:
        return np.zeros((0, HASH_BITS // 64), np.uint64)
    return np.stack([table[relative_key(s)] for s in samples])


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` whose hashes (rows of uint64 words) differ in at most
    ``max_distance`` bits: ``(i, j, d)``."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64).reshape(len(hashes), -1)
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(h), BLOCK):
        rows = h[start : start + BLOCK]
        # rows against themselves and every later one; int16: 256 bits overflow uint8
        dist = np.bitwise_count(rows[:, None] ^ h[None, start:]).sum(-1, dtype=np.int16)
        ii, jj = np.nonzero(dist <= max_distance)
        later = jj > ii  # jj counts from ``start`` as ii does: the upper triangle only
        ii, jj = ii[later], jj[later]
        found_i.append(ii + start)
        found_j.append(jj + start)
        found_d.append(dist[ii, jj])
    if not found_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return (
        np.concatenate(found_i).astype(np.int64),
        np.concatenate(found_j).astype(np.int64),
        np.concatenate(found_d).astype(np.int64),
    )


# --------------------------------------------------------------------------- the report


def _rank(sample: Sample) -> tuple[int, int]:
    return (SUBSETS.index(sample.subset), SPLITS.index(sample.split))


def _order(key: str) -> tuple[int, int]:
    subset, split = key.split("/")
    return (SUBSETS.index(subset), SPLITS.index(split))


def _label(subset: str, split: str) -> str:
    return f"{subset} {SPLIT_DIRS[split]}"


def straddles(a: Sample, b: Sample) -> bool:
    """One image in a split a model learns or is selected on (Train, Val), the other in Test."""
    return {a.split, b.split} in ({"train", "test"}, {"val", "test"})


@dataclass
class Group:
    """The pairs between two splits (``a`` and ``b``, ``<subset>/<split>``, ``a <= b``)."""

    a: str
    b: str
    kind: str  # within_split | across_splits | across_subsets
    straddles: bool
    pairs: list[dict[str, Any]]


def find_duplicates(
    root: str | os.PathLike[str],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Hash every image under ``root`` (both subsets, all splits) and group the near pairs.

    A JSON-ready report: ``{"root", "max_distance", "images", "groups": [{"a", "b", "kind",
    "straddles", "count", "pairs": [{"a", "b", "distance"}]}], "straddling": n}``, paths relative
    to ``root``. Structural problems of the tree are refused first (:class:`DataError`).
    """
    from covidqu.data.layout import scan

    if not 0 <= max_distance <= HASH_BITS:
        raise UserError(
            f"--max-distance {max_distance}: give a number of bits from 0 to {HASH_BITS} "
            f"(default {DEFAULT_MAX_DISTANCE})"
        )
    index = scan(root)
    index.raise_on_problems()
    samples: list[Sample] = []
    parts = []
    for subset in index.subset_dirs:
        mine = index.select(subset=subset)
        samples += mine
        parts.append(subset_hashes(index, subset, mine, cache_dir, workers, progress))
    hashes = np.concatenate(parts) if parts else np.zeros((0, HASH_BITS // 64), np.uint64)
    ii, jj, dd = near_pairs(hashes, max_distance)

    base = Path(root)
    groups: dict[tuple[str, str], Group] = {}
    for i, j, d in sorted(zip(ii.tolist(), jj.tolist(), dd.tolist(), strict=True)):
        a, b = sorted((samples[i], samples[j]), key=lambda s: (*_rank(s), s.image.name))
        key = (f"{a.subset}/{a.split}", f"{b.subset}/{b.split}")
        if key not in groups:
            kind = (
                "across_subsets"
                if a.subset != b.subset
                else "within_split"
                if a.split == b.split
                else "across_splits"
            )
            groups[key] = Group(*key, kind=kind, straddles=straddles(a, b), pairs=[])
        groups[key].pairs.append(
            {"a": _rel(a.image, base), "b": _rel(b.image, base), "distance": int(d)}
        )
    ordered = sorted(groups.values(), key=lambda g: (KINDS.index(g.kind), _order(g.a), _order(g.b)))
    for g in ordered:
        g.pairs.sort(key=lambda p: (p["distance"], p["a"], p["b"]))
    return {
        "root": str(root),
        "hash": f"phash-{HASH_BITS}",
        "max_distance": max_distance,
        "images": len(samples),
        "images_per_split": {
            f"{sub}/{sp}": n
            for sub in index.subset_dirs
            for sp in SPLITS
            if (n := len(index.select(subset=sub, split=sp)))
        },
        "groups": [
            {
                "a": g.a,
                "b": g.b,
                "kind": g.kind,
                "straddles": g.straddles,
                "count": len(g.pairs),
                "pairs": g.pairs,
            }
            for g in ordered
        ],
        "straddling": sum(len(g.pairs) for g in ordered if g.straddles),
    }


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


KINDS = ("within_split", "across_splits", "across_subsets")
_HEADINGS = {
    "within_split": "Within a split",
    "across_splits": "Across splits of a subset",
    "across_subsets": (
        "Across subsets (expected: the infection subset's images largely come from the lung "
        "subset, so the same CXR in both is no fault; pairs are listed only where they straddle "
        "a training split and a test split, since a lung model trained on one is then tested on "
        "the other, as the two-stage analysis does)"
    ),
}


def format_report(report: dict[str, Any], limit: int = 20) -> str:
    """The report as text: a count per pair of splits, then its pairs (``limit`` at most, except
    pairs that straddle train and test, which are all listed)."""

    def name(key: str) -> str:
        return _label(*key.split("/"))

    per_split = ", ".join(f"{name(k)} {n:,}" for k, n in report["images_per_split"].items())
    lines = [
        f"Near-duplicates under {report['root']}: {report['hash']}, Hamming distance <= "
        f"{report['max_distance']}, {report['images']:,} images ({per_split or 'none'})",
    ]
    for kind in KINDS:
        groups = [g for g in report["groups"] if g["kind"] == kind]
        lines += ["", f"{_HEADINGS[kind]}:"]
        if not groups:
            lines.append("  no pairs")
        for g in groups:
            flag = "  <- straddles train and test" if g["straddles"] else ""
            lines.append(f"  {name(g['a'])} – {name(g['b'])}: {g['count']:,} pairs{flag}")
            if kind == "across_subsets" and not g["straddles"]:
                continue
            shown = g["pairs"] if g["straddles"] or limit <= 0 else g["pairs"][:limit]
            lines += [f"    {p['a']}  ~  {p['b']}  (distance {p['distance']})" for p in shown]
            if len(shown) < len(g["pairs"]):
                more = len(g["pairs"]) - len(shown)
                lines.append(f"    ... and {more:,} more (--json lists all)")
    lines.append("")
    if report["straddling"]:
        lines.append(
            f"LEAK: {report['straddling']:,} pair(s) straddle a training split (Train or Val) and "
            "a Test split (marked above): a model trained or selected on one image is scored on "
            "its near-copy. Remove one of each pair, or move it to the other's split."
        )
    else:
        lines.append("no pair straddles a training split (Train or Val) and a Test split")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

#: ``python -m covidqu.data duplicates`` exit codes: no leak; a pair straddles train (or val) and
#: test; bad input (not a COVID-QU-Ex tree, an unreadable file, a bad option).
EXIT_OK, EXIT_LEAK, EXIT_BAD_INPUT = 0, 1, 2


def add_arguments(parser: Any) -> None:
    """Add the options of ``python -m covidqu.data duplicates`` to ``parser``."""
    parser.add_argument("root", help="the extracted archive, a subset folder, or its inner folder")
    parser.add_argument(
        "--max-distance",
        type=int,
        default=DEFAULT_MAX_DISTANCE,
        help=f"Hamming distance (of {HASH_BITS} bits) up to which images pair (default "
        f"{DEFAULT_MAX_DISTANCE})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--limit",
        type=int,
        default=20,
        help="pairs listed per pair of splits (0: all); straddling pairs are always all listed",
    )
    add_cache_arguments(parser)


def run(args: Any) -> int:
    """Find and print the pairs; see the exit codes above."""
    import sys

    try:
        report = find_duplicates(
            args.root,
            max_distance=args.max_distance,
            cache_dir=args.cache_dir or default_cache_dir(),
            workers=args.workers,
            progress=progress_bar("hashing"),
        )
    except UserError as err:  # not a tree, structural problems, unreadable files, bad option
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.limit))
    return EXIT_LEAK if report["straddling"] else EXIT_OK
