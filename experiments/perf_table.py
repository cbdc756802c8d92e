"""Training speed of runs side by side: samples a second and data wait, and ratios to the first.

Each figure is what the data-wait meter (``covidqu/runtime/data_wait.py``) logged once an epoch
into the run's CSV log, ``RUN_DIR/csv/metrics.csv``: ``perf/samples_per_s`` (the whole job's)
and ``perf/data_wait`` (the share of the epoch spent waiting for batches). Where a run has more
than one epoch the first is left out (it holds compilation, cuDNN's benchmark and a cold file
cache), and a run's figure is the median over the others. The first run named is the one the
others are compared with: ``speed`` is its samples a second over theirs.

    python experiments/perf_table.py RUN_DIR [RUN_DIR ...]

``experiments/gpu_check.sh`` trains one model eagerly, in channels-last and compiled, and prints
this table of the three. Exit 2, naming the file, where a run has no such log or figures.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from covidqu.runtime.data_wait import DATA_WAIT, SAMPLES_PER_S


class NoFigures(Exception):
    """A run folder without the figures the table reads; the message names the file."""


@dataclass(frozen=True)
class Speed:
    """One run's figures: over ``used`` of its ``epochs`` epochs."""

    name: str
    epochs: int
    used: int
    samples_per_s: float
    data_wait: float


def epoch_figures(run: Path) -> dict[int, tuple[float, float]]:
    """``epoch -> (samples a second, data wait)`` from a run's CSV log (the last row of an
    epoch where there are several)."""
    log = run / "csv" / "metrics.csv"
    if not log.is_file():
        raise NoFigures(
            f"{log} does not exist: pass a training run's folder, trained with "
            "logger=csv or logger=many (the table reads its csv/metrics.csv)"
        )
    with open(log, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(SAMPLES_PER_S) and r.get(DATA_WAIT)]
    if not rows:
        raise NoFigures(
            f"{log} has no {SAMPLES_PER_S} / {DATA_WAIT} figures: train with the "
            "data-wait meter (callbacks.data_wait, on by default) and at least two steps an epoch"
        )
    return {int(r["epoch"]): (float(r[SAMPLES_PER_S]), float(r[DATA_WAIT])) for r in rows}


def speed_of(run: Path) -> Speed:
    """A run's figures: the median over its epochs after the first."""
    figures = epoch_figures(run)
    epochs = sorted(figures)
    used = epochs[1:] or epochs
    return Speed(
        name=run.name,
        epochs=len(epochs),
        used=len(used),
        samples_per_s=statistics.median(figures[e][0] for e in used),
        data_wait=statistics.median(figures[e][1] for e in used),
    )


def table(speeds: list[Speed]) -> str:
    """A Markdown table of ``speeds``, each run's speed as a ratio to the first's."""
    base = speeds[0]
    lines = [
        f"| run | epochs | samples/s | data wait | speed vs {base.name} |",
        "|---|---|---|---|---|",
    ]
    for s in speeds:
        ratio = s.samples_per_s / base.samples_per_s
        lines.append(
            f"| {s.name} | {s.used} of {s.epochs} | {s.samples_per_s:.1f} | "
            f"{100 * s.data_wait:.1f} % | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the base")
    args = ap.parse_args(argv)
    try:
        speeds = [speed_of(run) for run in args.runs]
    except NoFigures as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(speeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
