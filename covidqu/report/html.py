"""``report.html``: one page, whole in itself, for a run, a sweep, an eval or an analysis folder.

The page holds every figure inline (PNG as ``data:`` URIs) and a few lines of its own script
to sort the table of runs: no network, no file beside it, so it can be mailed or archived as
one file. Sections appear where the folder holds what they show:

- runs (``.hydra/config.yaml`` below the folder): the table of every column of
  ``report.csv``, one row per run, sortable by clicking a header; each varying
  hyperparameter against the monitored metric; an Optuna study's figures;
- learning curves from each run's CSV log (``csv/metrics.csv``);
- the figures of an eval or analysis: the PNG files the command wrote (ROC, severity,
  reliability, grade confusion), the confusion matrix, per-class means, a classifier's ROC;
- the worst images, with their overlays (:mod:`covidqu.report.gallery`).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidqu.files import write_atomic
from covidqu.report.figures import (
    LOG_FILE,
    confusion_figure,
    covid_roc,
    hyperparameter_plots,
    learning_curves,
    per_class,
    per_epoch,
)
from covidqu.report.gallery import WORST_N, image_rows, worst
from covidqu.report.run import cell, ordered_columns, read_monitor, run_name, varying
from covidqu.report.study import study_figures

REPORT_HTML = "report.html"
#: PNG files eval, analyze and tune=lr write into their folder, shown as they are.
WRITTEN_FIGURES = {
    "roc.png": "ROC curve",
    "severity.png": "severity: predicted against true",
    "reliability.png": "reliability diagram",
    "grade_confusion.png": "grade confusion matrix",
    "lr_find.png": "learning-rate finder: loss against learning rate, the suggestion marked",
}
#: Runs whose learning curves the page draws, best first (each is one figure).
MAX_CURVES = 20

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { color: #b00; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.gallery figure { width: 260px; font-size: 0.8em; }
.note { color: #666; font-style: italic; }
"""

# Sorting the table of runs by a clicked header: numbers as numbers, empty cells last.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent.trim(), y = b.cells[col].textContent.trim();
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = Number(x), ny = Number(y), d;
        d = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return up ? d : -d;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _img(data: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _figure(title: str, data: bytes) -> str:
    return f"<figure>{_img(data, title)}<figcaption>{html.escape(title)}</figcaption></figure>"


def runs_table(table: Sequence[Mapping[str, Any]]) -> str:
    """The table of runs: every column, the monitored metric first, sortable."""
    columns = ordered_columns(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    lines = []
    for row in table:
        cells = []
        for c in columns:
            value = row.get(c)
            kind = ' class="num"' if isinstance(value, int | float) else ""
            cells.append(f"<td{kind}>{html.escape(cell(value))}</td>")
        failed = ' class="failed"' if row.get("status") == "failed" else ""
        lines.append(f"<tr{failed}>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table class="sortable" id="runs">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table></div>"
    )


def _runs_section(root: Path, table: Sequence[Mapping[str, Any]]) -> list[str]:
    runs = [r for r in table if r.get("status") != "summary"]
    parts = [f"<h2>Runs ({len(runs)})</h2>", runs_table(table)]
    parts.append(
        '<p class="note">Click a column header to sort. Every column is also in report.csv '
        "and report.md.</p>"
    )
    monitors = {r.get("monitor") for r in runs} - {None, ""}
    keys = varying(table)
    if len(runs) > 1 and keys and len(monitors) == 1:
        metric = monitors.pop()
        plots = hyperparameter_plots(runs, keys, metric)
        if plots:
            parts.append("<h3>Hyperparameters against the monitored metric</h3>")
            parts += [_figure(t, d) for t, d in plots]
    elif len(runs) > 1 and keys:
        parts.append(
            f'<p class="note">No plot of the hyperparameters: the runs monitor different '
            f"metrics ({', '.join(sorted(map(str, monitors)))}).</p>"
        )
    study = study_figures(root)
    if study:
        parts.append("<h3>Optuna study</h3>")
        parts += [_figure(t, d) for t, d in study]
    return parts


def _curves_section(root: Path, table: Sequence[Mapping[str, Any]]) -> list[str]:
    folders = [root / r["run"] for r in table if r.get("status") != "summary"]
    if (root / LOG_FILE).is_file() and root.resolve() not in {f.resolve() for f in folders}:
        folders.insert(0, root)
    logged = [f for f in folders if (f / LOG_FILE).is_file()]
    parts = []
    for folder in logged[:MAX_CURVES]:
        series = per_epoch(folder / LOG_FILE)
        data = learning_curves(series, read_monitor(folder))
        if data is None:
            continue
        name = run_name(folder, root)
        title = f"learning curves of {name}"
        parts.append(_figure(title, data))
    if not parts:
        return []
    if len(logged) > MAX_CURVES:
        parts.append(
            f'<p class="note">{len(logged) - MAX_CURVES} more runs have a CSV log: only the '
            f"first {MAX_CURVES} in the table are drawn.</p>"
        )
    return ["<h2>Learning curves</h2>", *parts]


def _figures_section(root: Path) -> list[str]:
    parts = [
        _figure(t, (root / n).read_bytes())
        for n, t in WRITTEN_FIGURES.items()
        if (root / n).is_file()
    ]
    if (root / "confusion_matrix.csv").is_file():
        data = confusion_figure(root / "confusion_matrix.csv")
        if data:
            parts.append(_figure("confusion matrix", data))
    source, rows = image_rows(root)
    if rows and not (root / "roc.png").is_file():
        data = covid_roc(rows)
        if data:
            parts.append(_figure("ROC curve: COVID-19 against the rest", data))
    if rows:
        first = rows[0]
        columns = [c for c in ("dice", "iou", "lung_dice", "infection_dice") if c in first]
        columns += [c for c in first if c.startswith("p_")] if not columns else []
        data = per_class(rows, columns)
        if data:
            parts.append(_figure(f"per class ({source})", data))
    return ["<h2>Figures</h2>", *parts] if parts else []


def _gallery_section(root: Path, n: int) -> list[str]:
    label, shown = worst(root, n)
    if not shown:
        source, rows = image_rows(root)
        if not rows:
            return []
        return [
            "<h2>Images</h2>",
            f'<p class="note">{len(rows)} rows in {source}, with no truth to rank them by '
            "(scored on a split, analyze and eval write the per-image Dice or the class): "
            "no gallery of the worst.</p>",
        ]
    parts = [
        f"<h2>The {len(shown)} worst images</h2>",
        f'<p class="note">Ranked by {html.escape(label)}, worst first.</p>',
        '<div class="gallery">',
    ]
    missing = 0
    for item in shown:
        text = f"{item.name} ({item.cls}): {item.badness_label} {item.badness:.3g}"
        details = ", ".join(f"{k}={v}" for k, v in item.details.items())
        if item.overlay is not None:
            picture = _img(item.overlay.read_bytes(), item.name)
        else:
            missing += 1
            picture = '<p class="note">no overlay written for this image</p>'
        parts.append(
            f'<figure class="worst">{picture}<figcaption><b>{html.escape(text)}</b><br>'
            f"{html.escape(details)}</figcaption></figure>"
        )
    parts.append("</div>")
    if missing:
        parts.append(
            f'<p class="note">{missing} of these images have no overlay in this folder: eval '
            "and a training run's test keep overlays of their num_worst worst images (raise "
            "num_worst to keep more).</p>"
        )
    return parts


def build_page(root: Path, table: Sequence[Mapping[str, Any]], worst_n: int) -> str | None:
    """The page for ``root``; ``None`` where it holds nothing a section shows."""
    sections: list[str] = []
    if len(table) == 1 and table[0]["run"] == "." and not table[0].get("monitor"):
        table = []  # an eval or analysis folder alone: its metrics.json says more
    if table:
        sections += _runs_section(root, table)
    sections += _curves_section(root, table)
    sections += _figures_section(root)
    sections += _gallery_section(root, worst_n)
    if not sections:
        return None
    if (root / "metrics.json").is_file() and not table:
        figures_json = json.loads((root / "metrics.json").read_text())
        items = "".join(
            f"<tr><td>{html.escape(k)}</td><td class='num'>{html.escape(cell(v))}</td></tr>"
            for k, v in figures_json.items()
        )
        sections[:0] = ["<h2>metrics.json</h2>", f"<table>{items}</table>"]
    title = f"covidqu report: {root.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(root.resolve()))}</p>"
        + "\n".join(sections)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(
    root: Path, table: Sequence[Mapping[str, Any]], worst_n: int = WORST_N
) -> Path | None:
    """Write ``root/report.html`` (whole or not at all); ``None`` where there is nothing."""
    page = build_page(root, table, worst_n)
    if page is None:
        return None
    return write_atomic(root / REPORT_HTML, page)
