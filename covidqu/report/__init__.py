"""``python -m covidqu.report DIR``: compare the runs under a folder, without W&B.

Finds every run under DIR (single runs; basic, Optuna and submitit sweeps), prints a table
sorted by the monitored metric with the overrides that distinguish the runs, their status,
every validation and test figure, epochs and duration, and writes ``report.csv`` and
``report.md`` into DIR. Exits 1 when a run failed, 2 when DIR holds no run.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidqu.report", description=__doc__)
    parser.add_argument("dir", help="a sweep folder, a run folder, or any folder of runs")
    parser.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = parser.parse_args(argv)
    from covidqu.report.run import report  # here: --help needs no torch

    try:
        table = report(args.dir, quiet=args.quiet)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not table:
        print(f"error: no runs (folders with .hydra/config.yaml) under {args.dir}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in table) else 0
