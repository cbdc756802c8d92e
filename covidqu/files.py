"""Files that appear complete or not at all.

Every file a run leaves (checkpoints, ``metrics.json``, ``failure.txt``, CSV logs and tables,
pictures, reports) is written to a temporary file in the same folder, flushed and fsynced, then
renamed over its final name with ``os.replace``: a reader, a resumed run or a crash sees the old
file or the new one, never half of one. A write that fails (a full disk, a quota, an error of
our own) removes its temporary file and leaves the file it would have replaced as it was.

A temporary file is named ``.<name>.<pid>.tmp``: one left by a process killed mid-write (kill
-9, a node that died) is recognised by its name and the pid that no longer runs
(:func:`remove_stale_temporaries`).

A full disk (``ENOSPC``) or an exhausted quota (``EDQUOT``) becomes a :class:`DiskFullError`
that names the file, how much it needed and how much the file system had free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from covidqu.errors import UserError

log = logging.getLogger(__name__)

#: The errors of a file system that has no room left for a write.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class DiskFullError(UserError):
    """No room left for a file a run writes: which file, what it needed, what was free.

    Not bad input, but nothing covidqu can fix: the command ends with this message and exit
    status 1, without a traceback; what the run wrote before stays as it was.
    """

    exit_code = 1

    def __init__(
        self, path: str | os.PathLike[str], needed: int | None = None, kept: str = ""
    ) -> None:
        self.path = Path(path)
        self.needed = needed
        self.free = free_bytes(self.path.parent)
        need = f"it needs about {megabytes(needed)}" if needed else "it did not fit"
        super().__init__(
            f"no space left on the device writing {self.path}: {need}, and the file system has "
            f"{megabytes(self.free)} free. Free some space there, or write the run elsewhere "
            f"(paths.output_dir=... or hydra.run.dir=...).{kept}"
        )

    def keeping(self, kept: str) -> DiskFullError:
        """The same error, its message ending with ``kept`` (what the run still has)."""
        return DiskFullError(self.path, self.needed, kept)


def disk_full(err: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` ``err`` is, or was raised from (or a new one for a bare
    ``ENOSPC`` / ``EDQUOT`` in its chain); ``None`` when the disk had nothing to do with it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DiskFullError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = no_space(err)
    return None if found is None else DiskFullError(found.filename or "a file of the run")


def megabytes(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 2**20:,.1f} MB"


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Bytes free for a user in ``folder``'s file system (its nearest existing ancestor's)."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def no_space(err: BaseException) -> OSError | None:
    """The ``ENOSPC`` / ``EDQUOT`` error behind ``err`` (itself, its cause or its context)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same folder, so the rename
    never crosses file systems)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (the one place the bytes of a file are written)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see the module docstring); a
    :class:`DiskFullError` when it does not fit, checked before the first byte where the
    free space is known."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(path.parent)
    if free is not None and len(payload) > free:
        raise DiskFullError(path, len(payload))
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise DiskFullError(path, len(payload)) from err
        raise
    _fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike[str], newline: str | None = None) -> Iterator[IO[str]]:
    """A text file to write ``path`` through (a CSV writer, say): what was written replaces
    ``path`` atomically when the block ends, and nothing does if it raises."""
    import io

    buffer = io.StringIO(newline=newline)
    yield buffer
    write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (a library's own save): once the
    block ends, the file written there replaces ``path``; if the block raises, it is removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise DiskFullError(path) from err
        raise
    _fsync_folder(path.parent)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files in ``folder`` of writers that no longer run (killed
    mid-write); the files removed."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        found = _TEMPORARY.match(tmp.name)
        if found is None or _running(int(found["pid"])):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
            log.warning(
                "removed %s: the unfinished write of %s by process %s, which no longer runs",
                tmp,
                found["name"],
                found["pid"],
            )
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def describe_files(folder: str | os.PathLike[str], pattern: str = "*.ckpt") -> str:
    """``name (size)`` of each file of ``folder`` matching ``pattern``, for a message; or
    ``none``."""
    files = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    return ", ".join(f"{f.name} ({megabytes(f.stat().st_size)})" for f in files) or "none"


def bytes_of(write: Any) -> bytes:
    """What ``write(buffer)`` writes into an in-memory binary file (``torch.save``,
    ``Figure.savefig``), for :func:`write_atomic`."""
    import io

    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()
