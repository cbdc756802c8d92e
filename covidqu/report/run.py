"""Comparing runs without W&B: every run under a folder, as one table.

A run is a folder with Hydra's ``.hydra/config.yaml`` (single runs, and each job of a basic,
Optuna or submitit sweep). Its status comes from the files it left: ``metrics.json`` (completed),
``failure.txt`` (failed), ``lr_find.json`` alone from ``tune=lr`` without ``tune.apply`` (tuned: it
found its learning rate and stopped, as asked) or none of them (running, or killed without a
word).

Runs of a k-fold sweep (``data.num_folds``) that differ only in ``data.fold`` are one experiment:
each fold keeps its row, and two rows more give the mean and the standard deviation across the
folds of every figure.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidqu.files import atomic_text, write_atomic
from covidqu.runtime.config import split_override
from covidqu.runtime.outputs import FAILURE_FILE, METRICS_FILE, lr_suggestion

REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
#: The statuses of runs that did what they were asked: neither failed nor unfinished.
DONE = ("completed", "tuned")
#: Overrides that differ between runs but say nothing about the experiment.
_IGNORED_KEYS = ("hydra.", "paths.output_dir")


@dataclass
class Run:
    """One run folder and what it left."""

    path: Path
    status: str
    overrides: dict[str, str]
    figures: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    mode: str = "max"
    epochs: int | None = None
    duration_s: float | None = None
    error: str | None = None
    num_folds: int | None = None
    fold: int | None = None
    tuned_lr: float | None = None  # the learning-rate finder's suggestion (tune=lr)

    @property
    def score(self) -> float | None:
        value = self.figures.get(self.monitor) if self.monitor else None
        return None if value is None or math.isnan(value) else value


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _failure(path: Path) -> tuple[str | None, float | None]:
    text = path.read_text(errors="replace")
    error = re.search(r"^error: (.*)$", text, re.MULTILINE)
    duration = re.search(r"^duration_s: ([0-9.]+)$", text, re.MULTILINE)
    return (error.group(1) if error else None, float(duration.group(1)) if duration else None)


def read_run(folder: Path) -> Run:
    """What ``folder`` (a run folder) holds."""
    overrides = _load_yaml(folder / ".hydra" / "overrides.yaml") or []
    config = _load_yaml(folder / ".hydra" / "config.yaml") or {}
    task = config.get("task") or {}
    run = Run(
        path=folder,
        status="incomplete",
        overrides=dict(split_override(str(o)) for o in overrides),
        monitor=task.get("monitor"),
        mode=task.get("monitor_mode", "max"),
    )
    metrics_file, failure_file = folder / METRICS_FILE, folder / FAILURE_FILE
    newest = max(
        (p for p in (metrics_file, failure_file) if p.is_file()),
        key=lambda p: p.stat().st_mtime,
        default=None,
    )
    if newest == metrics_file:
        data = json.loads(metrics_file.read_text())
        run.status = "completed"
        run.figures = {
            k: float(v) if v is not None else math.nan
            for k, v in data.items()
            if k.startswith(("train/", "val/", "test/")) and _is_number_or_null(v)
        }
        run.monitor = data.get("monitor", run.monitor)
        run.epochs = data.get("epochs")
        run.duration_s = data.get("duration_s")
        run.num_folds, run.fold = data.get("num_folds"), data.get("fold")
        run.tuned_lr = data.get("tuned_lr")
    elif newest == failure_file:
        run.status = "failed"
        run.error, run.duration_s = _failure(failure_file)
    elif not (config.get("tune") or {}).get("apply"):  # tune.apply=true trains after finding
        try:
            run.tuned_lr = lr_suggestion(folder)
            run.status = "tuned"
        except (OSError, ValueError, KeyError, TypeError):  # no finder here, or no suggestion
            pass
    return run


def run_folders(root: Path) -> list[Path]:
    """Every run folder at or under ``root``: each folder with a ``.hydra/config.yaml``."""
    return sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")})


def run_name(folder: Path, root: Path) -> str:
    """How the report names a run folder under ``root`` (its ``run`` column)."""
    return folder.relative_to(root).as_posix() or "."


def find_runs(root: str | Path) -> list[Run]:
    """Every run folder at or under ``root``."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is not a folder of runs")
    return [read_run(f) for f in run_folders(base)]


def distinguishing(runs: Sequence[Run]) -> list[str]:
    """Override keys whose values differ between runs (or that some runs lack)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    keys = [k for k in keys if not k.startswith(_IGNORED_KEYS)]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def sort_runs(runs: Sequence[Run]) -> list[Run]:
    """Best first by each run's monitored metric; runs without a score last."""

    def key(run: Run) -> tuple[int, float]:
        s = run.score
        if s is None:
            return (1, 0.0)
        return (0, -s if run.mode == "max" else s)

    return sorted(runs, key=key)


#: The status of the rows of the mean and standard deviation across folds (not runs themselves).
SUMMARY = "summary"
#: The override that picks a fold: runs that differ only in it are folds of one experiment.
FOLD_KEY = "data.fold"


def rows(runs: Sequence[Run], root: Path) -> list[dict[str, Any]]:
    """One flat row per run: folder, distinguishing overrides, status, figures; then, for runs
    that differ only in ``data.fold``, a row of the mean and one of the standard deviation."""
    folded = any(r.fold is not None for r in runs)
    keys = [k for k in distinguishing(runs) if not (folded and k == FOLD_KEY)]
    stage_order = {"val": 0, "test": 1}
    figure_keys = sorted(
        {k for r in runs for k in r.figures if k.split("/")[0] in stage_order},
        key=lambda k: (stage_order[k.split("/")[0]], k),
    )
    tuned = any(r.tuned_lr is not None for r in runs)
    out = []
    for run in sort_runs(runs):
        row: dict[str, Any] = {"run": run_name(run.path, root)}
        row.update({k: run.overrides.get(k, "") for k in keys})
        if folded:
            row["fold"] = run.fold
        row["status"] = run.status
        row["monitor"] = run.monitor or ""
        row.update({k: run.figures.get(k) for k in figure_keys})
        row["epochs"] = run.epochs
        row["duration_s"] = None if run.duration_s is None else round(float(run.duration_s), 1)
        if tuned:
            row["tuned_lr"] = run.tuned_lr
        if run.error:
            row["error"] = run.error
        out.append(row)
    if folded:
        out += fold_summaries(runs, keys, figure_keys)
    return out


def fold_summaries(
    runs: Sequence[Run], keys: Sequence[str], figure_keys: Sequence[str]
) -> list[dict[str, Any]]:
    """For each set of completed fold runs alike but for ``data.fold`` (two or more), a row of
    the mean and a row of the sample standard deviation (n - 1) of each figure across them."""
    sets: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "completed" and run.fold is not None:
            alike = (run.num_folds, *(run.overrides.get(k, "") for k in keys))
            sets.setdefault(alike, []).append(run)
    out = []
    for alike, members in sets.items():
        if len({r.fold for r in members}) < 2:
            continue
        n = len(members)
        for stat in ("mean", "std"):
            row: dict[str, Any] = {"run": f"{stat} of {n} folds (of {alike[0]})"}
            row.update(dict(zip(keys, alike[1:], strict=True)))
            row["fold"] = stat
            row["status"] = SUMMARY
            row["monitor"] = members[0].monitor or ""
            for k in figure_keys:
                values = [r.figures[k] for r in members if k in r.figures]
                values = [v for v in values if not math.isnan(v)]
                row[k] = _mean_std(values)[stat == "std"] if len(values) == n else None
            row["epochs"] = None
            row["duration_s"] = round(sum(float(r.duration_s or 0) for r in members), 1)
            out.append(row)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def write_report(table: Sequence[dict[str, Any]], root: Path) -> tuple[Path, Path]:
    """``report.csv`` and ``report.md`` in ``root``."""
    columns: list[str] = []
    for row in table:
        columns += [k for k in row if k not in columns]
    csv_path, md_path = root / REPORT_CSV, root / REPORT_MD
    with atomic_text(csv_path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: cell(row.get(k)) for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [cell(row.get(k)).replace("|", "\\|") for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(md_path, f"# Runs under {root}\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


#: The most columns the terminal table shows (the files hold every column).
TERMINAL_COLUMNS = 8


def varying(table: Sequence[dict[str, Any]]) -> list[str]:
    """The override columns of ``table`` (those that differ between its runs)."""
    if not table:
        return []
    columns = list(table[0])
    end = min(columns.index(c) for c in ("fold", "status") if c in columns)
    return columns[1:end]


def ordered_columns(table: Sequence[dict[str, Any]]) -> list[str]:
    """Every column of ``table``, the monitored metric (or metrics) right after ``run``."""
    columns: list[str] = []
    for row in table:
        columns += [k for k in row if k not in columns]
    monitors = [m for m in dict.fromkeys(r.get("monitor") for r in table) if m in columns]
    rest = [c for c in columns if c not in monitors and c != "run"]
    return ["run", *monitors, *rest] if "run" in columns else [*monitors, *rest]


def terminal_columns(
    table: Sequence[dict[str, Any]], width: int | None = None, limit: int = TERMINAL_COLUMNS
) -> list[str]:
    """At most ``limit`` columns: the monitored metric first and its test figure (an eval
    run's only one), then the run, what varies and its status; then the others in the files'
    order while the table stays within ``width`` characters (``monitor`` only where runs
    differ in it)."""
    columns = [c for c in ordered_columns(table) if c != "error"]
    monitors = [m for m in dict.fromkeys(r.get("monitor") for r in table) if m in columns]
    first = [*monitors[:1], "run", *varying(table), "status"]
    if len(monitors) > 1:
        first.append("monitor")
    chosen = [c for c in dict.fromkeys(first) if c in columns][:limit]

    def span(c: str) -> int:  # a column's characters, with its border and padding
        return max(len(c), *(len(cell(r.get(c))) for r in table)) + 3

    used = 1 + sum(span(c) for c in chosen)
    tested = [f"test/{m.split('/', 1)[1]}" for m in monitors[:1] if m.startswith("val/")]
    for c in tested:  # beside the monitored metric (long cells of others wrap to make room)
        if c in columns and len(chosen) < limit:
            chosen.insert(1, c)
            used += span(c)
    for c in columns:
        if len(chosen) >= limit:
            break
        if c in chosen or c == "monitor":
            continue
        if width is not None and used + span(c) > width:
            continue
        chosen.append(c)
        used += span(c)
    return chosen


def print_table(table: Sequence[dict[str, Any]], title: str) -> None:
    """The report on the terminal: at most :data:`TERMINAL_COLUMNS` columns, as wide as the
    terminal (``report.csv``, ``report.md`` and ``report.html`` hold every column)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()  # the terminal's width (80 where output is not a terminal)
    columns = terminal_columns(table, console.width)
    every = [c for c in ordered_columns(table) if c != "error"]
    t = Table(title=title, show_lines=False)
    for c in columns:
        justify = "right" if c.startswith(("val/", "test/")) else "left"
        t.add_column(c, justify=justify, overflow="fold")  # long names wrap, never cut
    for row in table:
        style = "red" if row["status"] == "failed" else None
        t.add_row(*(cell(row.get(c)) for c in columns), style=style)
    console.print(t)
    hidden = len(every) - len(columns)
    if hidden > 0:
        console.print(f"{hidden} more columns in report.csv, report.md and report.html")
    for row in table:
        if row.get("error"):
            console.print(f"[red]{row['run']} failed:[/red] {row['error']}")


def read_monitor(folder: Path) -> str | None:
    """The metric a run folder monitored: from ``metrics.json``, else its config."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        try:
            found = json.loads(metrics.read_text()).get("monitor")
        except (OSError, ValueError):
            found = None
        if found:
            return str(found)
    for config in (folder / ".hydra" / "config.yaml", folder / "config.yaml"):
        task = (_load_yaml(config) or {}).get("task") if config.is_file() else None
        if isinstance(task, dict) and task.get("monitor"):
            return str(task["monitor"])
    return None


def report(root: str | Path, quiet: bool = False) -> list[dict[str, Any]]:
    """Find, sort, print and write the runs under ``root``; return the table's rows."""
    base = Path(root)
    runs = find_runs(base)
    table = rows(runs, base)
    if table:
        write_report(table, base)
    if table and not quiet:
        print_table(table, f"{len(table)} run(s) under {base}")
    return table
