"""What a test run keeps besides its figures: every process's per-image rows, and the images
it keeps overlays of (the split's first, and its worst as :mod:`covidqu.scoring.worst` ranks
them, the ranking of the report's gallery).

The worst are held in a list of at most ``worst`` items, refreshed after each batch: only the
images of a batch that would enter it are turned into overlay items (the image, truth and
prediction on the CPU), so a split of any size costs at most ``first + worst`` of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from covidqu.scoring.worst import badness, name_of, worst_first

#: Builds the overlay items of a batch's images at the given positions (the task's own).
MakeItems = Callable[[list[int]], list[dict[str, Any]]]


def gather_rows(rows: list[Any]) -> list[Any]:
    """Every process's per-image rows (any picklable items), in dataset order, on every process.

    Evaluation shards are interleaved (process ``r`` holds samples ``r, r + world, ...``), so
    taking one row from each process in turn restores the dataset's order. Lightning gathers
    tensors only, hence torch's object gather.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    merged = []
    for i in range(max(len(p) for p in parts)):
        merged += [p[i] for p in parts if i < len(p)]
    return merged


class KeptOverlays:
    """The overlay items of one test run: the ``first`` images of the split and its ``worst``.

    Args:
        first: how many of the split's first images to keep (eval's ``num_overlays``).
        worst: how many of its worst images to keep (``num_worst``).
    """

    def __init__(self, first: int = 0, worst: int = 0) -> None:
        self.first = max(0, int(first))
        self.worst = max(0, int(worst))
        self._first: list[dict[str, Any]] = []
        #: ``(sort key, item)``, worst first, at most :attr:`worst` long.
        self._worst: list[tuple[tuple[float, str], dict[str, Any]]] = []

    def offer(self, rows: Sequence[Mapping[str, Any]], make: MakeItems) -> None:
        """Keep what this batch adds: ``rows`` are its per-image rows, in batch order."""
        firsts = list(range(min(len(rows), self.first - len(self._first))))
        keys = {}
        for i, row in enumerate(rows):
            ranked = badness(row)
            if ranked is not None and self.worst:
                keys[i] = worst_first(ranked[1], name_of(row))
        entering = sorted(keys, key=keys.__getitem__)[: self.worst]
        if self._worst and len(self._worst) == self.worst:
            entering = [i for i in entering if keys[i] < self._worst[-1][0]]
        wanted = sorted(set(firsts) | set(entering))
        if not wanted:
            return
        items = dict(zip(wanted, make(wanted), strict=True))
        self._first += [items[i] for i in firsts]
        merged = self._worst + [(keys[i], items[i]) for i in entering]
        self._worst = sorted(merged, key=lambda pair: pair[0])[: self.worst]

    def gathered(self) -> list[dict[str, Any]]:
        """Every process's kept items, as a one-device run keeps them: the split's first
        images in its order, then the worst, worst first; an image is listed once."""
        first = gather_rows(self._first)[: self.first]
        worst = sorted(gather_rows(self._worst), key=lambda pair: pair[0])[: self.worst]
        seen = {item["id"] for item in first}
        return first + [item for _, item in worst if item["id"] not in seen]
