"""The packed cache's arrays are shared, not copied: two DDP ranks, or two DataLoader workers,
that read every sample of one packed cache hold its pixels once between them, in the pages of
the OS page cache that both map, and grow their own (anonymous) memory by almost nothing.

Measured per process from ``/proc/self/smaps``: over the mappings of the cache's files, Rss
(pages mapped), Pss (each page divided by the number of processes mapping it), and the pages
only this process maps (Private_*); and, over every mapping, the growth of Anonymous memory,
where a copy of the arrays would land.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from covidqu.data.layout import Sample, scan
from covidqu.data.packed import MANIFEST, PackedReader, ensure_packed

SMAPS = Path("/proc/self/smaps")
pytestmark = pytest.mark.skipif(
    not SMAPS.exists(), reason="needs /proc/self/smaps (Linux) to measure resident memory"
)

SUBSET = "infection"  # three arrays per split: images, lung and infection masks
SIZE = 256  # 27 images of the synthetic tree: about 5 MB of arrays
FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
TIMEOUT = 60


def smaps(folder: Path) -> dict[str, int]:
    """This process's memory, in bytes: the sums of ``FIELDS`` over its mappings of files
    inside ``folder``, and ``Anonymous`` over all its mappings."""
    totals = dict.fromkeys((*FIELDS, "Anonymous"), 0)
    inside = str(folder.resolve()) + os.sep
    in_folder = False
    with open(SMAPS) as fh:
        for line in fh:
            if MAPPING.match(line):
                fields = line.split(maxsplit=5)
                in_folder = len(fields) == 6 and fields[5].rstrip("\n").startswith(inside)
                continue
            key, _, value = line.partition(":")
            if key == "Anonymous" or (in_folder and key in FIELDS):
                totals[key] += int(value.split()[0]) * 1024  # "<n> kB"
    return totals


def read_all_and_measure(
    open_reader: Callable[[], PackedReader], samples: list[Sample], barrier
) -> dict[str, int]:
    """Open a reader, read every sample's image and masks, then, while the other process has
    read everything too and still maps the files, measure this process's memory."""
    before = smaps(Path(os.sep))["Anonymous"]
    reader = open_reader()
    for s in samples:
        reader.image(s)
        for kind in reader.kinds:
            reader.mask(s, kind)
    barrier.wait(TIMEOUT)  # both have read every page
    figures = smaps(reader.folder)
    figures["grown"] = figures.pop("Anonymous") - before
    barrier.wait(TIMEOUT)  # neither unmaps before the other has measured
    return figures


def _rank(folder: str, samples: list[Sample], barrier, results) -> None:
    results.put(read_all_and_measure(lambda: PackedReader(folder), samples, barrier))


def array_bytes(folder: Path) -> int:
    """The bytes of the image and mask arrays of every split: what reading every sample reads."""
    m = json.loads((folder / MANIFEST).read_text())
    h, w = m["size"]
    return sum(m["counts"].values()) * h * w * (1 + len(m["masks"]))


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def check_shared(figures: list[dict[str, int]], nbytes: int) -> None:
    """Each process maps (nearly) every byte it read, shares every mapped page with the other
    (Pss half of Rss, no private pages) and holds no copy of its own."""
    problems = []
    for who, f in enumerate(figures):
        private = f["Private_Clean"] + f["Private_Dirty"]
        shared = f["Shared_Clean"] + f["Shared_Dirty"]
        if f["Rss"] < 0.98 * nbytes:
            problems.append(
                f"process {who}: the cache's files are mapped for {mb(f['Rss'])} of the "
                f"{mb(nbytes)} of arrays it read: it does not read them through memory maps"
            )
        if abs(f["Pss"] - f["Rss"] / 2) > 0.02 * nbytes or private > 0.02 * nbytes:
            problems.append(
                f"process {who}: of {mb(f['Rss'])} mapped, Pss {mb(f['Pss'])} is not half and "
                f"{mb(private)} is private ({mb(shared)} shared): the two processes do not map "
                "the same pages"
            )
        if f["grown"] > 0.1 * nbytes:
            problems.append(
                f"process {who}: its anonymous memory grew by {mb(f['grown'])} while reading "
                f"{mb(nbytes)} of arrays: it holds a private copy of them"
            )
    table = "\n".join(
        f"  process {who}: " + ", ".join(f"{k} {mb(v)}" for k, v in f.items())
        for who, f in enumerate(figures)
    )
    if problems:
        pytest.fail("\n".join(problems) + f"\nmeasured:\n{table}", pytrace=False)


@pytest.fixture(scope="module")
def packed(synth_root, module_tmp) -> tuple[Path, list[Sample]]:
    index = scan(synth_root, subsets=[SUBSET])
    folder = ensure_packed(index, SUBSET, SIZE, module_tmp("packed-memory"), workers=1).folder
    return folder, index.select(subset=SUBSET)


def evict(folder: Path) -> None:
    """Drop the cache's arrays from the page cache (written back first), so that reading them
    starts from the disk."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("page_cache", ["warm", "cold"])
def test_two_ranks_share_the_mapped_arrays(packed, page_cache):
    """Two processes started as DDP ranks are (spawn), each opening the cache by its folder:
    just written (the pages still in the page cache) or read back from the disk."""
    folder, samples = packed
    if page_cache == "cold":
        evict(folder)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(str(folder), samples, barrier, results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        figures = [results.get(timeout=TIMEOUT) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT)
    assert [p.exitcode for p in procs] == [0, 0]
    check_shared(figures, array_bytes(folder))


class ReadAll:
    """A dataset of two items, one per DataLoader worker: item i is worker i reading every
    sample through the reader the loader handed it, and its memory measured."""

    def __init__(self, reader: PackedReader, samples: list[Sample], barrier) -> None:
        self.reader, self.samples, self.barrier = reader, samples, barrier

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict[str, int]:
        return read_all_and_measure(lambda: self.reader, self.samples, self.barrier)


def test_two_loader_workers_share_the_mapped_arrays(packed):
    """Two workers of one DataLoader (its default start method, as the DataModules use it)
    over a reader the main process opened and never read from."""
    import torch

    folder, samples = packed
    dataset = ReadAll(PackedReader(folder), samples, multiprocessing.Barrier(2))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, timeout=TIMEOUT
    )  # items are handed out in turn: worker 0 gets item 0, worker 1 item 1
    check_shared(list(loader), array_bytes(folder))
