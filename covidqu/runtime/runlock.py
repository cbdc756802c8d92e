"""One writer per run folder: a second process started on a folder that a live run is writing
(a duplicated Slurm job, the same command typed twice) is refused before it writes anything.

The live run holds ``RUN/.covidqu.lock``: a JSON note of who holds it (``host``, ``pid``,
``started``, ``command``, ``slurm_job_id``) and, on that open file, an exclusive ``flock`` for
as long as it runs. The kernel (or the file server) drops the ``flock`` when its process ends,
however it ends, ``kill -9`` included; so a lock file nobody holds was left by a process that
no longer runs, and the next run simply takes it over, saying whose it was. The note is only
for messages: whether a folder is in use is decided by the ``flock`` alone, never by a pid.

Only the job's first process locks: DDP processes 1..N-1 (re-launched by Lightning with
``LOCAL_RANK``, or started by Slurm with ``SLURM_PROCID``) write into the same folder by design.
A run that ends releases the lock and removes the file; a requeued job then starts as usual.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from covidqu.errors import UserError

log = logging.getLogger(__name__)

#: The lock file inside a run folder (hidden: it is bookkeeping, not a result).
LOCK_FILE = ".covidqu.lock"
#: Variables that give a process's place in a distributed job; any of them other than 0 marks a
#: process that is not the job's first (Lightning, torchrun, Slurm, LSF).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
                  "JSM_NAMESPACE_RANK")  # fmt: skip
#: How long taking the lock retries before refusing: another process's probe holds the file
#: for a moment, and a holder's note is written just after its lock is taken.
WAIT_S = 1.0
#: errno values of a file system that has no file locks (e.g. Lustre mounted without ``flock``).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)
#: Folders already warned about as having no file locks.
_UNGUARDED: set[Path] = set()


class FolderInUse(UserError):
    """The run folder is being written by another live process."""


def first_process() -> bool:
    """Whether this process is its job's first (global rank 0), or a job of one process."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value != "0":
            return False
    return True


def _locked(fd: int, kind: int, path: Path) -> bool:
    """Try ``flock(kind)`` without waiting: got it. Where the file system has no locks, say so
    once and go on unguarded (True)."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        if path.parent not in _UNGUARDED:
            _UNGUARDED.add(path.parent)
            log.warning(
                "the file system of %s has no file locks (%s): nothing stops a second process "
                "from writing into this run folder at the same time",
                path.parent,
                err.strerror or err,
            )
    return True


def _note(path: Path, wait_s: float = 0.0) -> dict[str, Any]:
    """The holder's note in ``path`` (empty when unreadable); waits up to ``wait_s`` for a note
    that its holder, having just taken the lock, has yet to write."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            note = json.loads(path.read_text())
            if isinstance(note, dict):
                return note
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _holder(note: dict[str, Any]) -> str:
    """Who a note names, in words."""
    if not note:
        return "a process that has not recorded itself yet"
    who = f"pid {note.get('pid')} on host {note.get('host')}"
    if note.get("slurm_job_id"):
        who += f" (Slurm job {note['slurm_job_id']})"
    who += f", started {note.get('started')}"
    return who + (f", command: {note['command']}" if note.get("command") else "")


def _in_use(folder: Path, path: Path) -> FolderInUse:
    note = _note(path, WAIT_S)
    if note.get("slurm_job_id"):
        stop = f"scancel {note['slurm_job_id']}"
    elif note:
        stop = f"kill {note.get('pid')} on {note.get('host')}"
    else:
        stop = "kill it"
    return FolderInUse(
        f"{folder} is in use by another run: {_holder(note)}.\nTwo processes writing one run "
        "folder overwrite each other's checkpoints and logs, so this one stops here, having "
        f"written nothing. Wait for that run to end; or stop it ({stop}) and start this one "
        "again, to resume from its checkpoints/last.ckpt; or give this run another folder: "
        f"hydra.run.dir=NEW_FOLDER. (The lock: {path})"
    )


def probe(folder: Path) -> None:
    """Raise :class:`FolderInUse` when a live process holds ``folder``'s lock; write nothing.

    The up-front check: it runs before Hydra writes ``.hydra/`` into the folder. Processes
    other than a job's first never refuse (their first process holds the lock).
    """
    path = folder / LOCK_FILE
    if not first_process():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (a fresh folder), or one :func:`take` will report
        return
    try:
        if not _locked(fd, fcntl.LOCK_SH, path):
            raise _in_use(folder, path)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its holder may have removed it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class RunLock:
    """A held run-folder lock (or, in a job's other processes, a stand-in holding nothing);
    :meth:`release` it when the run ends, however it ends."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent).

        Removed while still locked, so that no one takes it over in between; a process that
        opened the old file meanwhile sees that it was removed and locks the new one.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:  # the folder went away or became read-only: the lock still goes
            pass
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)  # also for DataLoader workers forked with it
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def take(folder: Path) -> RunLock:
    """Lock ``folder`` for this run, or raise :class:`FolderInUse` naming the live holder.

    A lock file left by a process that ended without releasing it (``kill -9``, a node that
    died) is taken over with a warning naming that process. In a job's processes other than
    its first, a stand-in that holds nothing.
    """
    path = folder / LOCK_FILE
    if not first_process():
        return RunLock(path)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if _locked(fd, fcntl.LOCK_EX, path) and _same_file(fd, path):
            break
        os.close(fd)
        if time.monotonic() >= deadline and path.exists():
            raise _in_use(folder, path)
        time.sleep(0.05)
    left = _note(path)
    if left:
        log.warning(
            "took over %s, left by %s, which no longer runs (killed, or its node died)",
            path,
            _holder(left),
        )
    note = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    os.fsync(fd)  # readable at once on other nodes of a shared file system
    return RunLock(path, fd)
