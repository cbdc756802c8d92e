"""What the data caches share (the packed arrays, the duplicates' hashes): where they live,
a file's line of a fingerprint, and the pool of processes that decode a whole tree."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from covidqu.data.layout import DataError


def default_cache_dir() -> Path:
    """Where ``paths.cache_dir`` points by default (conf/paths/default.yaml), for the CLI."""
    env = os.environ
    if env.get("COVIDQU_CACHE"):
        return Path(env["COVIDQU_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or f"{env.get('HOME', '.')}/.cache"
    return Path(base).expanduser() / "covidqu"


def file_stamp(path: str | os.PathLike[str], base: Path, doing: str, then: str = "") -> bytes:
    """One file's line of a fingerprint: its name relative to ``base``, its size and its
    modification time (ns), so a replaced or touched file changes the fingerprint. A file that
    cannot be read is a :class:`DataError` naming it (``doing``: what it was read for; ``then``:
    what to do after the fix)."""
    try:
        st = os.stat(path)
    except OSError as err:
        fix = "Restore it, or remove the image with its masks" + (f", {then}." if then else ".")
        raise DataError(f"cannot read {path} {doing}: {err.strerror or err}. {fix}") from err
    rel = Path(path).relative_to(base).as_posix()
    return f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()


def default_workers(workers: int | None) -> int:
    """``workers``, or by default one decoding process per core, at most 8."""
    return min(8, os.cpu_count() or 1) if workers is None else workers


def run_chunks(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    sizes: Sequence[int],
    workers: int,
    inline: bool,
    progress: Callable[[int], None] | None = None,
) -> list[Any]:
    """``fn(*args)`` for each ``args`` of ``calls``, the results in order: in this process when
    ``inline`` (too little work to start a pool) or with one worker, else in a pool of
    ``workers`` processes; ``progress(size)`` after each call (``sizes`` aligned with ``calls``).
    """
    results: list[Any] = []
    if inline or workers <= 1:
        for args, size in zip(calls, sizes, strict=True):
            results.append(fn(*args))
            if progress:
                progress(size)
        return results
    # spawn, not fork: the caller may be a training process with threads (or CUDA) running
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for fut, size in zip(futures, sizes, strict=True):
            results.append(fut.result())
            if progress:
                progress(size)
    return results


def add_cache_arguments(parser: Any) -> None:
    """The options of the ``data`` commands that decode a whole tree: where the cache is, and
    how many processes decode."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="as paths.cache_dir (default: $COVIDQU_CACHE, else ~/.cache/covidqu)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: up to 8)"
    )


def progress_bar(desc: str) -> Callable[..., Any]:
    """A factory of tqdm bars over images (``progress_bar(desc)(total=n)``), shown on an
    interactive stderr only: packing and hashing a tree take minutes, a log file needs no bar."""
    from tqdm import tqdm

    return partial(tqdm, desc=desc, unit="img", disable=None)
