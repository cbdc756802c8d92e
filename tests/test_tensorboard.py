"""TensorBoard: what a run leaves in <run>/tensorboard/, read back as TensorBoard reads it.

The shared lung run (``trained_run("lung")``) logs to CSV and TensorBoard; ``logger=many`` (CSV,
W&B offline and TensorBoard) is tested on the shared W&B run in test_wandb.py.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from covidqu.runtime.tensorboard_logger import CXRTensorBoardLogger

from pipeline_helpers import compose_config, read_metrics


def events(folder: Path) -> EventAccumulator:
    """Every event of ``folder`` (no sampling), as TensorBoard's backend loads a run."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_entry(acc: EventAccumulator) -> tuple[dict[str, object], list[str]]:
    """The HPARAMS view of a run: its hyper-parameters, and the metrics it shows beside them."""
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return params, [m.name.tag for m in experiment.metric_infos]


@pytest.fixture(scope="module")
def lung(trained_run) -> dict[str, object]:
    run = trained_run("lung")
    return {"run": run, "events": events(run / "tensorboard"), "metrics": read_metrics(run)}


def test_a_run_logs_its_scalars_to_tensorboard_in_its_folder(lung):
    scalars = lung["events"].Tags()["scalars"]
    assert "train/loss_epoch" in scalars and "train/dice" in scalars
    monitor = lung["metrics"]["monitor"]
    assert monitor == "val/dice"
    logged = lung["events"].Scalars(monitor)
    assert len({e.step for e in logged}) >= 2  # one per epoch (two), then the best checkpoint's
    assert logged[-1].value == pytest.approx(lung["metrics"][monitor])


def test_a_run_shows_validation_overlays_in_tensorboard(lung):
    acc = lung["events"]
    tags = [t for t in acc.Tags()["images"] if t.startswith("val/overlays/")]
    assert len(tags) == 4  # the first validation batch (4 images), below num_images=8
    assert all(t.split("/", 2)[2].startswith(("covid", "non_COVID", "Normal")) for t in tags)
    picture = acc.Images(tags[0])[-1]
    image = cv2.imdecode(np.frombuffer(picture.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.std() > 0
    assert image.shape[1] > 2.5 * image.shape[0]  # image | truth | prediction


def test_the_hparams_view_holds_the_config_and_the_final_figures(lung):
    params, shown = hparams_entry(lung["events"])
    config = OmegaConf.load(lung["run"] / "config.yaml")
    assert params["task/name"] == "lung"
    assert params["optimizer/lr"] == pytest.approx(config.optimizer.lr)
    assert params["data/image_size"] == 32
    metrics = lung["metrics"]
    assert {"val/dice", "test/dice", "test/iou"} <= set(shown)
    assert "hp_metric" not in shown  # no placeholder that would hide the real figures
    # TensorBoard shows the last value of each metric's scalar: metrics.json's figure
    for tag in ("val/dice", "test/dice"):
        assert lung["events"].Scalars(tag)[-1].value == pytest.approx(metrics[tag])


def test_each_logger_name_of_the_design_composes():
    """design.md: ``logger=csv|wandb|tensorboard|many``; many is the three together."""
    expected = {
        "csv": {"csv"},
        "wandb": {"wandb"},
        "tensorboard": {"tensorboard"},
        "many": {"csv", "wandb", "tensorboard"},
    }
    for name, loggers in expected.items():
        cfg = compose_config("train", [f"logger={name}"], Path("/tmp/unused"))
        assert set(cfg.logger) == loggers, name
    cfg = compose_config("train", ["logger=tensorboard"], Path("/tmp/run"))
    assert cfg.logger.tensorboard.save_dir == "/tmp/run"  # events inside the run folder


def test_a_resumed_run_replaces_the_steps_it_trains_again(tmp_path):
    first = CXRTensorBoardLogger(str(tmp_path))
    for step in range(10):
        first.log_metrics({"train/loss": 1.0}, step=step)
    first.finalize("success")
    # resumed from a checkpoint of step 5: steps 5 to 7 are trained and logged again
    again = CXRTensorBoardLogger(str(tmp_path))
    again.purge_from(5)
    for step in range(5, 8):
        again.log_metrics({"train/loss": 2.0}, step=step)
    again.finalize("success")
    logged = events(tmp_path / "tensorboard").Scalars("train/loss")
    assert [e.step for e in logged] == list(range(8))
    assert [e.value for e in logged] == [1.0] * 5 + [2.0] * 3
