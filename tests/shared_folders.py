"""Folders built once per test session and only read by the tests: the synthetic tree and the
tiny trained runs many tests need only a checkpoint of.

Under pytest-xdist every worker is a process of its own, and a module's tests may run on
several of them: a module-scoped fixture would build the same run once per worker. A folder
here is built by the first process that asks for it, under a file lock in the folder all the
session's processes share; the others wait for it and reuse its files. The session's base
temporary folder holds it, so pytest removes it with the rest when every test passed.

A test must not change a shared folder (it would change what the other tests see): its files
are made read-only, and after every test each folder handed out is compared with what its
builder left, so a test that writes into one fails, named, even where the read-only bits do
not stop it (as for root). A test that resumes or modifies a run copies it first.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

#: The name and size (bytes) and modification time of each file below a folder; a folder
#: maps to None. Any write changes it, without hashing big checkpoints.
Fingerprint = dict[str, tuple[int, int] | None]


def fingerprint(folder: Path) -> Fingerprint:
    """What a later write to ``folder`` would change."""
    found: Fingerprint = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        key = path.relative_to(folder).as_posix()
        found[key] = None if stat.S_ISDIR(info.st_mode) else (info.st_size, info.st_mtime_ns)
    return found


def session_base(basetemp: Path) -> Path:
    """The folder every process of this test session sees: the xdist workers' common parent
    (the controller's base temporary folder), or the single process's own one."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def _read_only(folder: Path) -> None:
    """Take the write bits off every file (a non-root writer then fails at once)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class SharedFolders:
    """Build-once folders under ``base``, and the check that no test changed them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        #: name -> (folder, its fingerprint when built), for the folders this process handed out
        self.handed_out: dict[str, tuple[Path, Fingerprint]] = {}

    def get(self, name: str, build: Callable[[Path], None]) -> Path:
        """The folder ``name``, filled by ``build(folder)`` in the first process that asks."""
        if name in self.handed_out:
            return self.handed_out[name][0]
        folder = self.base / name
        record = self.base / f"{name}.json"  # written last: the folder is complete
        with FileLock(str(self.base / f"{name}.lock")):
            if not record.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # half built by a process that died
                folder.mkdir()
                build(folder)
                _read_only(folder)
                record.write_text(json.dumps(fingerprint(folder)))
        expected = {k: tuple(v) if v else None for k, v in json.loads(record.read_text()).items()}
        self.handed_out[name] = (folder, expected)
        return folder

    def changed(self) -> list[str]:
        """One line per shared folder whose files differ from what its builder left; each is
        then taken as it is now, so that one change is reported once."""
        lines = []
        for name, (folder, expected) in self.handed_out.items():
            now = fingerprint(folder)
            if now == expected:
                continue
            keys = expected.keys() | now.keys()
            diff = sorted(
                k for k in keys if k not in expected or k not in now or expected[k] != now[k]
            )
            lines.append(f"{folder}: {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}")
            self.handed_out[name] = (folder, now)
        return lines


def copy_shared(source: Path, dest: Path, ignore: Callable[..., Any] | None = None) -> Path:
    """A private, writable copy of a shared folder, for a test that changes or resumes it (new
    files: the copy's modification times are its own, and no write bit is missing). ``ignore``
    as for :func:`shutil.copytree`."""
    shutil.copytree(source, dest, ignore=ignore, copy_function=shutil.copyfile)
    return dest
