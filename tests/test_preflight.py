"""Cheap things first: data, values and resume targets are checked before anything is built."""

from __future__ import annotations

import time

import pytest
from omegaconf import OmegaConf

from covidqu.errors import ConfigError, DataError, UserError
from covidqu.models import weights as weights_mod
from covidqu.models.networks import build_segmentation_model, check_input_size
from covidqu.models.weights import WeightsUnavailableError
from covidqu.runtime.checks import check_values
from covidqu.train import run as training
from covidqu.train.checks import check_resume
from tests.pipeline_helpers import TINY, compose_config


def test_a_missing_data_root_is_reported_before_any_network_is_built(tmp_path, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a network was built before the data root was checked")

    monkeypatch.setattr(training, "build", built)
    cfg = compose_config(
        "train", [*TINY, f"data.root={tmp_path}/missing", "encoder.weights=imagenet"], tmp_path
    )
    with pytest.raises(DataError, match="missing"):
        training.train(cfg)
    assert not (tmp_path / "failure.txt").exists()  # refused up front: nothing written


def test_without_the_hub_named_weights_fail_at_once_naming_the_ways_out(monkeypatch):
    monkeypatch.setattr(weights_mod, "_hub_reachable", lambda timeout=3.0: False)

    waits: list[float] = []  # the download's retries back off with time.sleep
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(WeightsUnavailableError) as err:
        build_segmentation_model(
            arch="unet", encoder_name="resnet18", encoder_weights="imagenet", classes=1
        )
    assert waits == [], "the download was retried instead of failing at once"
    assert "encoder.weights=null" in str(err.value)
    assert "encoder.weights=/path/to/state_dict.pth" in str(err.value)
    assert isinstance(err.value, UserError)


def _cfg(**values):
    return OmegaConf.create(values)


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("optimizer.lr", 1e-3, "abc"),
        ("optimizer.lr", 0.5, 0),
        ("data.batch_size", 8, True),
        ("data.batch_size", 8, 2.5),
        ("data.image_size", [256, 320], [256]),
        ("data.image_size", 64, 16),
        ("trainer.devices", "0,1", "x"),
        ("trainer.devices", -1, 0),
        ("trainer.max_epochs", -1, 0),
        ("trainer.precision", "bf16-mixed", "bf17"),
        ("trainer.limit_train_batches", 0.25, 1.5),
        ("data.limit_per_class", {"train": 4}, {"train": 0}),
    ],
)
def test_each_value_rule_takes_good_values_and_names_the_key_of_bad_ones(key, good, bad):
    check_values(_nested(key, good), "train")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_values(_nested(key, bad), "train")


def _nested(key: str, value):
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_all_wrong_values_are_listed_at_once():
    cfg = _cfg(optimizer={"lr": "abc"}, data={"batch_size": 0, "num_workers": -1})
    with pytest.raises(ConfigError) as err:
        check_values(cfg, "train")
    assert "3 config values" in str(err.value)
    for key in ("optimizer.lr", "data.batch_size", "data.num_workers"):
        assert key in str(err.value)


def test_an_image_size_the_network_cannot_take_is_refused_naming_the_key():
    net = build_segmentation_model(arch="fpn", encoder_name="resnet18", encoder_weights=None)
    check_input_size(net, 64)
    with pytest.raises(ConfigError, match=r"data\.image_size=48"):
        check_input_size(net, 48)


@pytest.fixture(scope="module")
def lung_run(trained_run):
    """A tiny lung run's folder (shared, read-only: the checks only read it)."""
    return trained_run("lung")


def test_a_folder_of_the_same_config_resumes(lung_run, synth_root):
    cfg = compose_config("train", [*TINY, f"data.root={synth_root}"], lung_run)
    assert check_resume(cfg, lung_run).path == lung_run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["task=classify", "model=classifier"], "task.name"),
        (["model=fpn"], "model.arch"),
        (["data.image_size=64"], "data.image_size"),
    ],
)
def test_a_folder_of_another_config_is_refused_naming_what_differs(
    lung_run, synth_root, overrides, named
):
    cfg = compose_config("train", [*TINY, f"data.root={synth_root}", *overrides], lung_run)
    with pytest.raises(ConfigError) as err:
        check_resume(cfg, lung_run)
    text = str(err.value)
    assert named in text and "auto_resume=false" in text and "hydra.run.dir=" in text
    if named == "task.name":  # every model key differs too: the first few, then a count
        assert "more" in text and text.count("\n  ") <= 8
    # and with auto_resume=false the folder is the user's to reuse
    cfg.auto_resume = False
    assert check_resume(cfg, lung_run) is None
