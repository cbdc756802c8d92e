"""``python -m covidqu.data inspect ROOT``: counts beside the official ones, and problems.

Exit codes: 0 when no problem was found, 1 when some were (each bad file is named), 2 when ROOT
is not a COVID-QU-Ex tree at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covidqu.constants import CLASSES, SPLITS
from covidqu.data.layout import OFFICIAL_COUNTS, NotADatasetError, scan
from covidqu.data.verify import verify

EXIT_OK, EXIT_PROBLEMS, EXIT_NOT_A_TREE = 0, 1, 2


def inspect_tree(
    root: str | Path,
    check_pixels: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Scan ``root`` (and decode every file when ``check_pixels``) into a JSON-ready report.

    ``{"root": ..., "counts": {"<subset>/<split>/<class>": n}, "official": {...},
    "problems": [{"path": <relative to root>, "problem": ...}], "verified": bool}``.
    Raises :class:`~covidqu.data.layout.NotADatasetError` when ``root`` is no COVID-QU-Ex tree.
    """
    root = Path(root)
    index = scan(root)
    problems = list(index.problems)
    if check_pixels:
        problems += verify(index, workers=workers, progress=progress)
    counts = index.counts()
    return {
        "root": str(root),
        "counts": counts,
        "official": {k: OFFICIAL_COUNTS[tuple(k.split("/"))] for k in counts},
        "problems": [p.relative_to(root) for p in problems],
        "verified": check_pixels,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table of counts per subset / split / class, then the problems."""
    counts, official = report["counts"], report["official"]
    lines = [f"COVID-QU-Ex tree at {report['root']}", ""]
    header = f"{'subset':<10} {'split':<6} " + " ".join(f"{c:>20}" for c in CLASSES)
    header += f" {'total':>15}"
    lines += [header, "-" * len(header)]
    subsets = list(dict.fromkeys(k.split("/")[0] for k in counts))
    for subset in subsets:
        tot_found = tot_official = 0
        for split in SPLITS:
            cells = []
            f_sum = o_sum = 0
            for cls in CLASSES:
                key = f"{subset}/{split}/{cls}"
                f, o = counts[key], official[key]
                f_sum, o_sum = f_sum + f, o_sum + o
                cells.append(f"{f:>8,} / {o:>6,}{'' if f == o else ' *':>4}")
            tot_found, tot_official = tot_found + f_sum, tot_official + o_sum
            lines.append(
                f"{subset:<10} {split:<6} "
                + " ".join(f"{c:>20}" for c in cells)
                + f" {f_sum:>7,} / {o_sum:>6,}"
            )
        lines.append(f"{subset:<10} {'all':<6} {'':>62} {tot_found:>7,} / {tot_official:>6,}")
    lines.append("")
    lines.append("cells: found / official; * marks a count that differs from the official release")
    problems = report["problems"]
    checked = (
        "every file decoded"
        if report["verified"]
        else "structure only; add --verify to decode every file"
    )
    if problems:
        lines.append(f"\n{len(problems)} problem(s) ({checked}):")
        lines += [f"  {p['path']}: {p['problem']}" for p in problems]
    else:
        lines.append(f"\nno problems found ({checked})")
    return "\n".join(lines)


def _progress() -> Callable[[int, int], None] | None:
    """A one-line counter on an interactive stderr (decoding the full dataset takes a while)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\rdecoded {done:,} / {total:,} samples", end=end, file=sys.stderr, flush=True)

    return show


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="the extracted archive, a subset folder, or its inner folder")
    parser.add_argument(
        "--verify", action="store_true", help="decode every image and mask and check each pair"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes for --verify (default: up to 8)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_tree(
            args.root, check_pixels=args.verify, workers=args.workers, progress=_progress()
        )
    except NotADatasetError as err:
        if args.json:
            print(json.dumps({"root": str(args.root), "error": str(err)}))
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NOT_A_TREE
    if args.json:
        print(
            json.dumps(
                {k: report[k] for k in ("root", "counts", "official", "problems", "verified")},
                indent=1,
            )
        )
    else:
        print(format_report(report))
    return EXIT_PROBLEMS if report["problems"] else EXIT_OK
