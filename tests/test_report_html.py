"""``report.html`` and the terminal table of ``python -m covidqu.report``: the page's sections
from what a folder holds, and the page opened in a real browser (headless Chromium).

The folders are made of the session's shared tiny runs: a folder of three trained runs (their
light files, with the ``.hydra/`` a sweep's jobs have) and an analysis of the synthetic Test
split by the shared lung and infection models. No training of its own.
"""

from __future__ import annotations

import base64
import csv
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from covidqu.report import html as report_html
from covidqu.report import main as report_main
from covidqu.report.figures import per_epoch
from covidqu.report.run import find_runs, print_table, rows, terminal_columns

from conftest import TRAINED_RUNS
from pipeline_helpers import TINY, compose_config, read_csv
from shared_folders import copy_shared

#: The system's browser and its driver (Debian's chromium and chromium-driver packages):
#: Selenium is pointed at them and never fetches its own.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SWEEP_KINDS = ("lung", "infection", "infection_multiclass")
#: A real 1x1 PNG, for overlays of hand-made folders.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def sweep_folder(
    trained_run: Callable[[str], Path], synth_root: Path, module_tmp: Callable[[str], Path]
) -> Path:
    """A sweep-like folder of three shared runs (no checkpoints), each with the ``.hydra/``
    files of a sweep's job: its resolved config and the overrides it was trained with."""
    sweep = module_tmp("sweep") / "sweep"
    for i, kind in enumerate(SWEEP_KINDS):
        job = copy_shared(
            trained_run(kind), sweep / str(i), ignore=shutil.ignore_patterns("checkpoints")
        )
        (job / ".hydra").mkdir()
        shutil.copyfile(job / "config.yaml", job / ".hydra" / "config.yaml")
        overrides = [*TINY, f"data.root={synth_root}", *TRAINED_RUNS[kind]]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return sweep


@pytest.fixture(scope="module")
def analyze_folder(
    trained_run: Callable[[str], Path], synth_root: Path, module_tmp: Callable[[str], Path]
) -> Path:
    """``analyze`` scored on the synthetic Test split by the shared lung and infection runs."""
    from covidqu.analyze.run import analyze

    out = module_tmp("analyze") / "analyze"
    args = [
        f"lung_ckpt={trained_run('lung') / 'checkpoints' / 'best.ckpt'}",
        f"infection_ckpt={trained_run('infection') / 'checkpoints' / 'best.ckpt'}",
        f"data.root={synth_root}",
        "split=test",
        "detect.threshold=1.0",
        "detect.n_boot=50",
    ]
    analyze(compose_config("analyze", args, out))
    return out


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def _self_contained(page: str) -> None:
    """No address the page would fetch: every picture inline, no outside script or style."""
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert '<link rel="stylesheet"' not in page
    assert all(src.startswith("data:image/png;base64,") for src in _images(page))
    for src in _images(page):
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")


# -- the terminal table and the page, without a browser ---------------------------------------


def test_terminal_table_fits_and_the_files_keep_every_column(
    sweep_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert report_main([str(sweep_folder)]) == 0
    out = capsys.readouterr().out
    table_lines = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert table_lines and max(len(line) for line in table_lines) <= 80
    header = [line.strip("┃").split("┃") for line in table_lines if line.startswith("┃")]
    shown = ["".join(part.strip() for part in cells) for cells in zip(*header, strict=True)]
    assert len(shown) <= 8 and shown[0] == "val/dice"  # the monitored metric first
    assert {"run", "task", "data.target", "loss", "trainer.max_epochs", "status"} <= set(shown)
    columns = list(read_csv(sweep_folder / "report.csv")[0])
    assert len(columns) > 8  # every column in the files
    assert f"{len(columns) - len(shown)} more columns in report.csv" in out
    assert re.search(r"report: .*report\.html", out)


def test_a_wide_table_keeps_eight_columns_within_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2x2 sweep's table had 27 columns, 378 characters wide: now 8 at most, in 100."""
    monkeypatch.setenv("COLUMNS", "100")
    figures = {f"val/figure_{i:02d}": 0.5 + i / 100 for i in range(20)}
    table = [
        {
            "run": str(i),
            "model": m,
            "loss": loss,
            "status": "completed",
            "monitor": "val/dice",
            "val/dice": 0.9 - i / 10,
            **figures,
            "epochs": 1,
            "duration_s": 3.0,
        }
        for i, (m, loss) in enumerate([("unet", "dice"), ("unet", "bce"), ("fpn", "dice")])
    ]
    assert len(table[0]) >= 27
    chosen = terminal_columns(table, 100)
    assert chosen[:5] == ["val/dice", "run", "model", "loss", "status"] and len(chosen) == 8
    # the monitored metric's test figure beside it, where the runs have one (an eval has no
    # other: it scores the test split)
    for row in table:
        row["test/dice"] = row["val/dice"] - 0.05
    assert terminal_columns(table, 100)[:6] == [
        "val/dice",
        "test/dice",
        "run",
        "model",
        "loss",
        "status",
    ]
    print_table(table, "wide")
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100


def test_sweep_page_holds_the_runs_their_plots_and_curves(sweep_folder: Path) -> None:
    assert report_main([str(sweep_folder), "--quiet"]) == 0
    page = (sweep_folder / report_html.REPORT_HTML).read_text()
    _self_contained(page)
    body = page.split('<table class="sortable" id="runs">', 1)[1].split("</table>", 1)[0]
    assert body.count("<tr>") == 1 + len(SWEEP_KINDS)  # the header and a row per run
    header = re.findall(r"<th>([^<]*)</th>", body)
    assert header[:2] == ["run", "val/dice"]
    assert set(read_csv(sweep_folder / "report.csv")[0]) <= set(header)  # every column
    # what varies between the three runs, each against the monitored metric
    for key in ("task", "data.target", "loss", "trainer.max_epochs"):
        assert f'alt="val/dice by {key}"' in page, key
    for i in range(len(SWEEP_KINDS)):
        assert f'alt="learning curves of {i}"' in page


def test_the_study_figures_appear_in_the_sweep_section(
    sweep_folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = copy_shared(sweep_folder, tmp_path / "sweep")
    seen = []

    def figures(root: Path) -> list[tuple[str, bytes]]:
        seen.append(root)
        return [("optimization history", PIXEL)]

    monkeypatch.setattr(report_html, "study_figures", figures)
    report_html.write_html(folder, rows(find_runs(folder), folder))
    page = (folder / report_html.REPORT_HTML).read_text()
    assert seen == [folder]
    assert "<h3>Optuna study</h3>" in page and 'alt="optimization history"' in page


def test_learning_curves_read_per_epoch_with_the_rate_of_each_epoch(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,lr-AdamW,step,train/loss_epoch,val/loss,val/dice\n"
        ",0.001,0,,,\n"  # the learning rate, logged as epoch 0 starts
        "0,,3,,0.9,0.2\n"
        "0,,3,0.8,,\n"
        ",0.0005,3,,,\n"  # ... and as epoch 1 starts
        "1,,7,,0.7,0.4\n"
        "1,,7,0.6,,\n"
        "2,,7,,0.65,0.45\n"  # the best checkpoint validated after training: no epoch
    )
    series = per_epoch(log)
    assert series["lr-AdamW"] == {0: 0.001, 1: 0.0005}
    assert series["train/loss_epoch"] == {0: 0.8, 1: 0.6}
    assert series["val/dice"] == {0: 0.2, 1: 0.4}


def _classifier_eval(folder: Path) -> list[str]:
    """A classifier's eval folder by hand: five images, overlays of the first two only; the
    names from worst to best by the probability given to the wrong classes."""
    folder.mkdir()
    probs = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.05, "e": 0.4}  # p of the true class
    rows = []
    for name, p in probs.items():
        cls = "COVID-19" if name in "ace" else "Normal"
        other = (1 - p) / 2
        row = {
            "id": f"img ({name})",
            "class": cls,
            "p_COVID-19": other,
            "p_Non-COVID": other,
            "p_Normal": other,
        }
        row[f"p_{cls}"] = p
        rows.append(row)
    with open(folder / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "overlays").mkdir()
    for name in ("img (a)", "img (d)"):
        (folder / "overlays" / f"{name}.png").write_bytes(PIXEL)
    (folder / "confusion_matrix.csv").write_text(
        "true,COVID-19,Non-COVID,Normal\nCOVID-19,2,0,1\nNon-COVID,0,0,0\nNormal,1,0,1\n"
    )
    return [f"img ({n})" for n in sorted(probs, key=probs.get)]


def test_a_classifier_eval_page_shows_its_worst_images_and_says_what_is_missing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "eval"
    worst_first = _classifier_eval(folder)
    assert report_main([str(folder), "--quiet", "--worst", "3"]) == 0
    page = (folder / report_html.REPORT_HTML).read_text()
    _self_contained(page)
    shown = re.findall(r'<figure class="worst">.*?<b>([^:<]*) \(', page)
    assert shown == worst_first[:3]  # d (0.05), b (0.2), e (0.4)
    assert "wrong-class probability" in page
    # d has an overlay; b and e have none, and the page says so
    assert page.count("no overlay written for this image") == 2
    assert "2 of these images have no overlay" in page
    assert 'alt="img (d)"' in page
    assert 'alt="confusion matrix"' in page and 'alt="ROC curve: COVID-19 against the rest"' in page


def test_a_folder_with_nothing_to_report_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no runs" in err and "per_image.csv" in err
    assert not (tmp_path / report_html.REPORT_HTML).exists()


def test_analyze_page_ranks_images_by_dice_with_their_overlays(analyze_folder: Path) -> None:
    assert report_main([str(analyze_folder), "--quiet", "--worst", "5"]) == 0
    page = (analyze_folder / report_html.REPORT_HTML).read_text()
    _self_contained(page)
    for name in ("ROC curve", "severity: predicted against true", "reliability diagram"):
        assert f'alt="{name}"' in page
    rows = read_csv(analyze_folder / "analysis.csv")
    badness = {r["id"]: 1 - min(float(r["lung_dice"]), float(r["infection_dice"])) for r in rows}
    expected = sorted(badness, key=lambda k: (-badness[k], k))[:5]
    shown = re.findall(r'<figure class="worst">.*?<b>([^:<]*) \(', page)
    assert shown == expected
    assert "no overlay written" not in page  # analyze writes every image's overlay
    assert all(f'alt="{name}"' in page for name in expected)


# -- in a real browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium through Selenium, both the system's. Skips, saying so, where no
    browser is installed; under CI (``CI=true``) that fails instead."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        why = f"no browser: {', '.join(missing)} not installed"
        why += " (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # the system's: Selenium fetches nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _open(driver, page: Path) -> None:
    driver.get(page.resolve().as_uri())
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
    )
    assert images, "no image on the page"
    assert [i for i in images if not (i[1] and i[2] > 0)] == []


def _column(driver, index: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#runs tbody tr'))"
        f".map(r => r.cells[{index}].textContent);"
    )


def test_sweep_page_in_a_browser_sorts_its_runs(browser, sweep_folder: Path, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    folder = copy_shared(sweep_folder, tmp_path / "sweep")
    assert report_main([str(folder), "--quiet"]) == 0
    _open(browser, folder / report_html.REPORT_HTML)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == len(SWEEP_KINDS)
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#runs thead th")]
    metric = headers.index("val/dice")
    before = [float(v) for v in _column(browser, metric)]
    assert before == sorted(before, reverse=True) and len(set(before)) > 1  # best first
    browser.find_elements(By.CSS_SELECTOR, "#runs thead th")[metric].click()
    after = [float(v) for v in _column(browser, metric)]
    assert after == sorted(before)  # ascending on the first click
    browser.find_elements(By.CSS_SELECTOR, "#runs thead th")[metric].click()
    assert [float(v) for v in _column(browser, metric)] == before
    # a column of text sorts as text, the runs' rows moving whole
    task = headers.index("task")
    runs_by_dice = dict(zip(_column(browser, 0), _column(browser, metric), strict=True))
    browser.find_elements(By.CSS_SELECTOR, "#runs thead th")[task].click()
    tasks = _column(browser, task)
    assert tasks == sorted(tasks, key=lambda t: (t == "", t))  # empty cells last
    assert dict(zip(_column(browser, 0), _column(browser, metric), strict=True)) == runs_by_dice
    assert browser.get_log("browser") == []  # clicking raised nothing


def test_analyze_page_in_a_browser(browser, analyze_folder: Path, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    folder = copy_shared(analyze_folder, tmp_path / "analyze")
    assert report_main([str(folder), "--quiet", "--worst", "4"]) == 0
    _open(browser, folder / report_html.REPORT_HTML)
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.worst img")) == 4


def test_a_training_run_page_has_its_curves_and_its_test_images_by_dice(
    trained_run: Callable[[str], Path], tmp_path: Path
) -> None:
    """A run folder without ``.hydra/`` (as the shared runs are): its metrics, learning
    curves, and its test images ranked by Dice, each with its overlay (the test of a training
    run keeps those of its ``num_worst`` worst)."""
    folder = copy_shared(
        trained_run("lung"), tmp_path / "lung", ignore=shutil.ignore_patterns("checkpoints")
    )
    assert report_main([str(folder), "--quiet", "--worst", "4"]) == 0
    page = (folder / report_html.REPORT_HTML).read_text()
    _self_contained(page)
    assert "<h2>metrics.json</h2>" in page and 'alt="learning curves of ."' in page
    rows = read_csv(folder / "per_image.csv")
    expected = sorted(rows, key=lambda r: (float(r["dice"]), r["id"]))[:4]
    shown = re.findall(r'<figure class="worst">.*?<b>([^:<]*) \(', page)
    assert shown == [r["id"] for r in expected]
    assert "no overlay written" not in page
    assert all(f'alt="{r["id"]}"' in page for r in expected)


def test_an_analysis_of_images_without_truth_gets_a_page_saying_so(tmp_path: Path) -> None:
    folder = tmp_path / "analysis"
    folder.mkdir()
    (folder / "analysis.csv").write_text(
        "file,status,severity_pct,grade,covid,covid_score\n"
        "in/a.png,ok,3.5,mild,1,3.5\nin/b.png,unreadable,,,,\n"
    )
    (folder / "a_overlay.png").write_bytes(PIXEL)
    assert report_main([str(folder), "--quiet"]) == 0
    page = (folder / report_html.REPORT_HTML).read_text()
    assert "2 rows in analysis.csv, with no truth to rank them by" in page


def _tune_run(folder: Path, apply: bool, optimizer: str, suggestion: float) -> None:
    """A run folder as ``tune=lr`` leaves it: the config, lr_find.json and lr_find.png."""
    import cv2
    import numpy as np

    (folder / ".hydra").mkdir(parents=True)
    config = {"task": {"monitor": "val/dice"}, "tune": {"name": "lr", "apply": apply}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer={optimizer}"]))
    (folder / "lr_find.json").write_text(f'{{"suggestion": {suggestion}}}')
    cv2.imwrite(str(folder / "lr_find.png"), np.full((40, 60, 3), 200, np.uint8))


def test_a_finder_run_is_tuned_not_unfinished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tune=lr alone stops after the finder, as asked: its row says tuned, with the suggested
    rate, and neither the report nor a sweep of such runs counts it as failed; with
    tune.apply=true the same files without metrics.json mean the run has not finished."""
    from omegaconf import OmegaConf

    from covidqu.report.sweep import SweepSummary

    sweep = tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    summary = SweepSummary()
    summary.on_multirun_start(config)
    _tune_run(sweep / "0", apply=False, optimizer="adam", suggestion=0.003)
    _tune_run(sweep / "1", apply=False, optimizer="sgd", suggestion=0.05)
    summary.on_multirun_end(config)  # no SystemExit: both did what they were asked
    table = {r["run"]: r for r in rows(find_runs(sweep), sweep)}
    assert {k: (r["status"], r["tuned_lr"]) for k, r in table.items()} == {
        "0": ("tuned", 0.003),
        "1": ("tuned", 0.05),
    }
    assert report_main([str(sweep / "0")]) == 0
    page = (sweep / "0" / report_html.REPORT_HTML).read_text()
    assert 'alt="learning-rate finder: loss against learning rate' in page

    applied = tmp_path / "applied"
    _tune_run(applied, apply=True, optimizer="adam", suggestion=0.003)
    (run,) = find_runs(applied)
    assert run.status == "incomplete"  # it trains after the finder: no metrics.json yet


def test_hyperparameters_are_plotted_where_they_vary_among_scored_runs() -> None:
    """A training run and an eval of its checkpoint differ in ckpt_path, which compares
    nothing (the eval has no val/dice); a run that scored 0 is a point like any other."""
    from covidqu.report.figures import hyperparameter_plots

    table = [
        {"run": "0", "loss": "dice", "ckpt_path": "", "val/dice": 0.0},
        {"run": "1", "loss": "bce", "ckpt_path": "", "val/dice": 0.8},
        {"run": "eval", "loss": "", "ckpt_path": "1/best.ckpt", "val/dice": None},
    ]
    plots = hyperparameter_plots(table, ["loss", "ckpt_path"], "val/dice")
    assert [title for title, _ in plots] == ["val/dice by loss"]
