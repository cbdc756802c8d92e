"""What the data caches share (the packed arrays, the duplicates' hashes): where they live,
a file's line of a fingerprint, and the pool of processes that decode a whole tree."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from covidqu.data.layout import DataError
from covidqu.errors import ConfigError

log = logging.getLogger(__name__)


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


class LogProgress:
    """Progress for a log file (a batch job's, ``nohup``'s): a line at every tenth of the work,
    where a terminal gets a bar; the same ``update(k)`` and ``close()`` as tqdm's."""

    def __init__(self, desc: str, total: int, steps: int = 10) -> None:
        self.desc, self.total, self.steps = desc, total, steps
        self.done, self.said = 0, 0

    def update(self, k: int) -> None:
        self.done += k
        step = self.done * self.steps // max(self.total, 1)
        if step > self.said:
            self.said = step
            pct = 100 * self.done // max(self.total, 1)
            log.info("%s: %d of %d images (%d %%)", self.desc, self.done, self.total, pct)

    def close(self) -> None:
        pass


def progress_bar(desc: str) -> Callable[..., Any]:
    """A factory of progress reports over images (``progress_bar(desc)(total=n)``): packing and
    hashing a tree take minutes. A tqdm bar on an interactive stderr, else a log line at every
    tenth (:class:`LogProgress`)."""
    if not sys.stderr.isatty():
        return partial(LogProgress, desc)
    from tqdm import tqdm

    return partial(tqdm, desc=desc, unit="img")


class NoRoomError(DataError):
    """The cache folder lacks the room for the packed arrays (found before packing, or when the
    arrays' space was reserved); nothing was left behind."""


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir``, or :func:`default_cache_dir` where it is unset."""
    return default_cache_dir() if cache_dir in (None, "") else Path(cache_dir).expanduser()


#: ``data.cache``: null (auto on a GPU, none elsewhere; the DataModule decides), or one of these.
CACHE_SETTINGS = ("none", "packed", "auto")


def check_cache_setting(cache: str | None, png_reader: bool) -> str | None:
    """``data.cache`` as given, once known to be one of :data:`CACHE_SETTINGS` or null, and
    not asked to replace a reader of a user's own (``png_reader`` false)."""
    if cache is not None and cache not in CACHE_SETTINGS:
        raise ConfigError(
            f"data.cache={cache!r} is not one of none|packed|auto: 'none' decodes the PNG "
            "files every epoch, 'packed' decodes them once into arrays under data.cache_dir, "
            "'auto' packs them where the disk has the room (null: auto on a GPU)"
        )
    if cache in ("packed", "auto") and not png_reader:
        raise ConfigError(
            f"data.cache={cache} reads pixels from its own arrays and replaces a data.reader of "
            "your own: set data.reader=png, or data.cache=none"
        )
    return cache


def choose_cache(
    setting: str | None, on_gpu: bool, capped: bool, pack: Callable[[], Any]
) -> Path | None:
    """The packed cache's folder to read (``pack()`` builds it, or finds it built, and returns
    a :class:`~covidqu.data.packed.Packed`), or None to read the PNG files, for ``data.cache`` =
    ``setting``: none, packed, auto, or None (auto where the run trains ``on_gpu``, else none).

    ``auto`` reads the PNG files, saying why, where ``pack`` finds no room or cannot write, or
    when the run is ``capped`` (``data.limit_per_class``: packing the whole subset would take
    longer than the run); ``packed`` raises a :class:`DataError` with the fix instead.
    """
    if setting is None:
        setting = "auto" if on_gpu else "none"
    if setting == "none":
        return None
    if setting == "auto" and capped:
        log.info(
            "data.cache=auto: reading the PNG files of this run capped with "
            "data.limit_per_class (packing the whole subset would take longer than the run; "
            "data.cache=packed packs it anyway)"
        )
        return None
    try:
        return pack().folder
    except (NoRoomError, OSError) as err:
        unwritable = getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS)
        if not isinstance(err, NoRoomError) and not unwritable:
            raise
        if setting == "packed":
            raise DataError(
                f"data.cache=packed: {err}. Free space there, set data.cache_dir to a folder "
                "with room, or data.cache=none (or auto: PNG files when there is no room)"
            ) from err
        log.warning(
            "data.cache=auto: %s; reading the PNG files instead (slower: free space, or set "
            "data.cache_dir to a folder with room)",
            err,
        )
        return None
