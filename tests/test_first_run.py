"""What a new user meets first: progress in a terminal and in log files, the config named not
dumped, the checkpoints' size on disk, a loss that does not fit the task refused up front, the
loader's workers fitted to the machine, and third-party notices they cannot act on kept quiet."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from covidqu.errors import CheckpointError, ConfigError
from covidqu.runtime import outputs
from covidqu.runtime.checkpoint_io import TRAINING_STATE
from covidqu.runtime.checks import check_values
from covidqu.runtime.config import print_config
from covidqu.runtime.progress import LogLines, MonitorRichBar, progress_bar
from covidqu.runtime.quiet import quiet_third_party
from covidqu.train.checks import check_config, check_resume

from pipeline_helpers import TINY, compose_config

# -- progress --------------------------------------------------------------------------------------


class _Tiny(pl.LightningModule):
    """A linear model that logs a loss (on the bar, as covidqu's modules do) and a monitor."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/dice", 0.25 + 0.5 * self.current_epoch)  # not on the bar

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(bar: pl.Callback, epochs: int = 2, *more: pl.Callback) -> tuple[pl.Trainer, _Tiny]:
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[bar, *more],
        logger=False,
        enable_checkpointing=bool(more),
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = _Tiny()
    trainer.fit(model, data, data)
    return trainer, model


def test_log_lines_say_epoch_loss_and_monitor_at_a_steady_pace(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="covidqu.runtime.progress")
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/dice", mode="max")
    _fit(LogLines(monitor="val/dice", every_s=None, every_n_steps=2), 2, best)
    lines = [r.getMessage() for r in caplog.records if r.name == "covidqu.runtime.progress"]
    ends = [line for line in lines if " done" in line]
    assert len(ends) == 2  # one line per epoch end
    assert ends[0].startswith("epoch 1/2 done, train/loss ")
    assert "val/dice 0.25 (best" not in ends[0] or "(best 0.25)" in ends[0]
    assert "val/dice 0.75 (best 0.75)" in ends[1]  # this epoch's value, the best so far
    assert all("elapsed 0:00:" in line for line in lines)
    steps = [line for line in lines if ", step " in line]
    assert [s.split(",")[1].strip() for s in steps[:2]] == ["step 2/4", "step 4/4"]
    assert all("train/loss " in s for s in steps)


def test_log_lines_every_few_seconds(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="covidqu.runtime.progress")
    clock = iter(range(0, 10_000, 7))  # every call to the clock: 7 s later
    monkeypatch.setattr("covidqu.runtime.progress.time.monotonic", lambda: next(clock))
    _fit(LogLines(monitor="val/dice", every_s=10), epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "covidqu.runtime.progress"]
    assert any(", step " in line for line in lines)  # 7 s per step: a line every other step
    assert any(line.startswith("validation: batch ") for line in lines)


def test_the_bar_shows_the_monitored_metric():
    trainer, model = _fit(MonitorRichBar(monitor="val/dice"), epochs=1)
    shown = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert shown["val/dice"] == pytest.approx(0.25)
    assert "train/loss_epoch" in shown or "train/loss_step" in shown


def test_a_terminal_gets_the_bar_and_a_file_the_lines():
    assert isinstance(progress_bar("val/dice", terminal=True), MonitorRichBar)
    lines = progress_bar("val/dice", every_s=30, terminal=False)
    assert isinstance(lines, LogLines) and lines.every_s == 30 and lines.monitor == "val/dice"
    assert isinstance(progress_bar("val/dice"), LogLines)  # pytest captures the output


# -- the config: named, printed on request ---------------------------------------------------------


def test_the_config_is_named_in_one_line_and_printed_on_request(tmp_path, caplog, capsys):
    cfg = compose_config("train", [*TINY], tmp_path)
    assert cfg.print_config is False
    saved = tmp_path / "config.yaml"
    caplog.set_level(logging.INFO, logger="covidqu.runtime.config")
    print_config(cfg, saved)
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [
        f"config: {saved} (print_config=true prints it here)"
    ]
    cfg.print_config = True
    print_config(cfg, saved)
    assert "batch_size: 4" in capsys.readouterr().out
    cfg.print_config = "maybe"
    with pytest.raises(ConfigError, match="print_config='maybe': must be true or false"):
        check_values(cfg, "train")


# -- checkpoints -----------------------------------------------------------------------------------


def test_best_ckpt_keeps_weights_not_training_state(trained_run: Callable[[str], Path], tmp_path):
    run = trained_run("lung")
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not set(TRAINING_STATE) & set(best)
    assert best["state_dict"].keys() == last["state_dict"].keys() and "covidqu" in best
    assert last["optimizer_states"] and last["lr_schedulers"]  # resuming needs them
    size = {p.name: p.stat().st_size for p in (run / "checkpoints").iterdir()}
    assert size["best.ckpt"] < 0.5 * size["last.ckpt"]  # Adam's two moments per weight gone
    # resuming from best.ckpt is refused up front, naming last.ckpt
    cfg = compose_config(
        "train",
        [*TINY, "trainer.max_epochs=3", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"],
        tmp_path,
    )
    with pytest.raises(CheckpointError, match=r"holds the weights only.*checkpoints/last\.ckpt"):
        check_resume(cfg, tmp_path)


# -- a loss that does not fit the task -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["loss=ce"], "loss=ce does not fit task=lung (data.target=lung, a binary mask"),
        (["task=infection", "loss=dice_ce"], "loss=dice_ce does not fit task=infection"),
        (["task=classify", "loss=dice"], "loss=dice does not fit task=classify"),
        (["task=classify", "loss=dice_bce"], "loss=dice_bce does not fit task=classify"),
        (
            ["task=infection", "data.target=infection_multiclass", "loss=bce"],
            "loss=bce does not fit task=infection (data.target=infection_multiclass, 3 classes",
        ),
        (["task=classify", "loss.class_weights=[1,2]"], "class_weights has 2 weights"),
    ],
)
def test_a_loss_that_cannot_score_the_task_is_refused_up_front(overrides, said, tmp_path):
    cfg = compose_config("train", [*TINY, *overrides], tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert said in str(caught.value)
    assert "Choose a loss that fits: loss=" in str(caught.value)


def test_the_losses_offered_fit_the_task(tmp_path):
    cfg = compose_config("train", [*TINY, "loss=ce"], tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    fits = str(caught.value).split("loss=")[-1].split(", ")
    assert {"bce", "dice_bce", "dice", "focal"} <= set(fits)
    assert not {"ce", "ce_smooth", "dice_ce"} & set(fits)


# -- loader workers fitted to the machine ----------------------------------------------------------


@pytest.mark.parametrize(("cores", "processes", "workers"), [(2, 1, 1), (16, 1, 4), (8, 4, 1)])
def test_auto_workers_fit_the_cores(monkeypatch, cores, processes, workers):
    from covidqu.data.loading import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loader_workers("auto", processes) == workers
    assert loader_workers(6, processes) == 6  # a number is kept as given
    with pytest.raises(ValueError, match=r"data\.num_workers must be auto or an integer"):
        loader_workers("some")


def test_the_data_default_is_auto(synth_root, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = compose_config("train", [f"data.root={synth_root}"], tmp_path)
    assert cfg.data.num_workers == "auto"
    assert instantiate(cfg.data).num_workers == 1  # two cores: one for training, one loader


def test_predict_fits_its_workers_too(
    trained_run: Callable[[str], Path], synth_root: Path, tmp_path: Path, monkeypatch
):
    """predict read images with 4 loader processes on any machine (torch warned of them on
    two cores); it takes auto as the training data does (analyze keeps 0: conf/analyze.yaml)."""
    import covidqu.predict.run as predict_run

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert compose_config("predict", [], tmp_path).num_workers == "auto"
    seen: list[int] = []
    real = predict_run.input_loader

    def spy(files, pre, batch_size, workers, pin):
        seen.append(workers)
        return real(files, pre, batch_size, workers, pin)

    monkeypatch.setattr(predict_run, "input_loader", spy)
    folder = synth_root / "Lung Segmentation Data" / "Lung Segmentation Data" / "Test" / "Normal"
    ckpt = trained_run("lung") / "checkpoints" / "best.ckpt"
    rows = predict_run.predict(ckpt, folder / "images", tmp_path / "out", num_workers="auto")
    assert rows and seen == [1]  # two cores: one for this process, one loader


# -- third-party notices ---------------------------------------------------------------------------


def test_notices_a_user_cannot_act_on_are_silenced_and_others_kept(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(
            "The `srun` command is available on your system but is not used.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1
        )
        warnings.warn("some other warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other warning"]
    caplog.set_level(logging.INFO)
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning.info("💡 Tip: For seamless cloud logging, try installing litlogger")
    lightning.info(
        "Trainer already configured with model summary callbacks: [RichModelSummary]. "
        "Skipping setting a default `ModelSummary` callback."
    )
    lightning.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_headline_figures_are_compact():
    lines = outputs.headline({"test/dice": 0.91234, "test/iou": 0.8, "images": 9, "x/ok": True})
    assert lines == ["test/dice 0.9123   test/iou 0.8000"]
    many = outputs.headline({f"test/metric_{i}": 0.5 for i in range(20)}, width=60)
    assert len(many) > 1 and all(len(line) <= 60 for line in many)
