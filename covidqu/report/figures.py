"""The report page's figures, drawn in memory as PNG bytes (inlined into ``report.html``).

Each takes what a folder already holds (a run's CSV log, the table of runs, ``per_image.csv``,
``analysis.csv``, ``confusion_matrix.csv``) and returns PNG bytes, or ``None`` where the
data for it is not there. Figures that a command already wrote as PNG files (``roc.png``,
``severity.png``, ``reliability.png``, ...) are read as they are, not drawn again.
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidqu.files import bytes_of
from covidqu.scoring.plots import figure, plot_roc

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: A run's CSV log, as Lightning's CSVLogger writes it under the run folder.
LOG_FILE = Path("csv") / "metrics.csv"


def png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes."""
    return bytes_of(lambda buffer: fig.savefig(buffer, format="png"))


def number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (empty cells, text, NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) or math.isinf(out) else out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def per_epoch(path: Path) -> dict[str, dict[int, float]]:
    """Each column of a run's CSV log as ``{epoch: value}``, the last value logged in the
    epoch, over the training epochs.

    The learning-rate monitor's rows carry a step but no epoch: they are logged as an epoch
    starts, so each belongs to the epoch of the next row that names one.
    """
    series: dict[str, dict[int, float]] = {}
    pending: list[dict[str, str]] = []
    for row in read_csv(path):
        epoch = number(row.get("epoch"))
        if epoch is None:
            pending.append(row)
            continue
        for held in [*pending, row]:
            for key, cell in held.items():
                value = number(cell)
                if value is not None and key not in ("epoch", "step"):
                    series.setdefault(key, {})[int(epoch)] = value
        pending = []
    # after the last training epoch come the best checkpoint's validation and test: not
    # points of any curve
    trained = [e for k, v in series.items() if k.startswith("train/") for e in v]
    if trained:
        last = max(trained)
        series = {k: {e: x for e, x in v.items() if e <= last} for k, v in series.items()}
    return {k: v for k, v in series.items() if v}


def _first(series: Mapping[str, Any], *names: str) -> str | None:
    return next((n for n in names if n in series), None)


def learning_curves(series: Mapping[str, dict[int, float]], monitor: str | None) -> bytes | None:
    """Train and val loss, the monitored metric and the learning rate against the epoch."""
    metric = monitor.split("/", 1)[1] if monitor and "/" in monitor else None
    panels: list[tuple[str, list[str]]] = []
    losses = [_first(series, "train/loss_epoch", "train/loss"), _first(series, "val/loss")]
    if any(losses):
        panels.append(("loss", [k for k in losses if k]))
    if metric:
        found = [k for k in (f"train/{metric}", f"val/{metric}") if k in series]
        if found:
            panels.append((monitor or metric, found))
    rates = sorted(k for k in series if k.startswith("lr-"))
    if rates:
        panels.append(("learning rate", rates))
    if not panels:
        return None
    fig = figure(4.0 * len(panels), 3.4)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            epochs = sorted(series[key])
            ax.plot(epochs, [series[key][e] for e in epochs], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return png(fig)


def hyperparameter_plots(
    table: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str
) -> list[tuple[str, bytes]]:
    """One plot per hyperparameter that varies among the runs with a score: its value against
    ``metric``, one point per run (numbers on a numeric axis, anything else as categories). A
    key that varies only between scored and unscored runs (a training run and an eval of its
    checkpoint, told apart by ``ckpt_path``) compares nothing and has no plot."""
    out = []
    for key in keys:
        points = [(row.get(key), number(row.get(metric))) for row in table]
        points = [
            (str(x) if x not in (None, "") else "(default)", y)
            for x, y in points
            if y is not None  # a score of 0 is a point
        ]
        if len({x for x, _ in points}) < 2:
            continue
        fig = figure(4.0, 3.2)
        ax = fig.add_subplot()
        xs = [number(x) for x, _ in points]
        if all(x is not None for x in xs):
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            labels = sorted({x for x, _ in points})
            ax.scatter([labels.index(x) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by {key}")
        ax.grid(alpha=0.3)
        out.append((f"{metric} by {key}", png(fig)))
    return out


def confusion_figure(path: Path) -> bytes | None:
    """``confusion_matrix.csv`` (one row per true class, a column per predicted one) as a
    heat map with its counts."""
    rows = read_csv(path)
    if not rows:
        return None
    first = next(iter(rows[0]))
    truth = [r[first] for r in rows]
    predicted = [k for k in rows[0] if k != first]
    counts = [[number(r[k]) or 0.0 for k in predicted] for r in rows]
    fig = figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    top = max((max(r) for r in counts), default=0.0)
    for i, line in enumerate(counts):
        for j, value in enumerate(line):
            color = "white" if top and value > top / 2 else "black"
            ax.text(j, i, f"{value:g}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(predicted)), predicted, rotation=20, ha="right")
    ax.set_yticks(range(len(truth)), truth)
    ax.set_xlabel("predicted")
    ax.set_ylabel(f"true ({first})")
    ax.set_title("confusion matrix")
    return png(fig)


def per_class(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> bytes | None:
    """The mean of each per-image figure in ``columns`` for each class, as grouped bars."""
    classes = sorted({r.get("class", "") for r in rows} - {""})
    columns = [c for c in columns if any(number(r.get(c)) is not None for r in rows)]
    if not classes or not columns:
        return None
    fig = figure(max(4.0, 1.6 * len(classes) * max(1, len(columns)) / 2), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        means = []
        for name in classes:
            values = [number(r.get(column)) for r in rows if r.get("class") == name]
            values = [v for v in values if v is not None]
            means.append(sum(values) / len(values) if values else 0.0)
        ax.bar([i + j * width for i in range(len(classes))], means, width, label=column)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes)
    ax.set_ylabel("mean per image")
    ax.set_title("per class")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return png(fig)


def covid_roc(rows: Sequence[Mapping[str, str]]) -> bytes | None:
    """A classifier's ROC curve of COVID-19 against the rest from ``p_COVID-19`` (threshold
    0.5 marked); ``None`` where the rows lack it or hold one side only."""
    scores = [number(r.get("p_COVID-19")) for r in rows]
    if not rows or any(s is None for s in scores):
        return None
    truth = [int(r.get("class") == "COVID-19") for r in rows]
    if len(set(truth)) < 2:
        return None
    # plot_roc (shared with analyze) writes a file: drawn into a private folder, read back
    with tempfile.TemporaryDirectory() as folder:
        return plot_roc(scores, truth, 0.5, Path(folder) / "roc.png").read_bytes()
