"""``python -m covidqu.report DIR``: compare the runs under a folder, without W&B.

Finds every run under DIR (single runs; basic, Optuna and submitit sweeps), prints a table
sorted by the monitored metric with the overrides that distinguish the runs, their status,
every validation and test figure, epochs and duration (at most 8 columns, the monitored metric
first), and writes ``report.csv`` and ``report.md`` (every column) and ``report.html`` (one
self-contained page: the table, learning curves, an eval's or analysis's figures and its worst
images) into DIR. Exits 1 when a run failed, 2 when DIR holds neither a run nor the outputs of
an eval or analysis.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidqu.report", description=__doc__)
    parser.add_argument("dir", help="a sweep folder, a run folder, or any folder of runs")
    parser.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    parser.add_argument(
        "--worst", type=int, default=12, metavar="N", help="images in report.html's gallery"
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    from covidqu.report.html import write_html  # here: --help needs no torch
    from covidqu.report.run import report

    try:
        table = report(args.dir, quiet=args.quiet)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    page = write_html(Path(args.dir), table, args.worst)
    if not table and page is None:
        print(
            f"error: no runs (folders with .hydra/config.yaml) under {args.dir}, and no eval "
            "or analyze outputs (per_image.csv, analysis.csv, roc.png, confusion_matrix.csv)",
            file=sys.stderr,
        )
        return 2
    if page is not None and not args.quiet:
        print(f"report: {page}")
    return 1 if any(r["status"] == "failed" for r in table) else 0
