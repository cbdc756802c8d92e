"""Starting a network from a covidqu checkpoint of another run: ``encoder.load_decoder=true``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from covidqu.errors import CheckpointError, ConfigError, UserError
from covidqu.models.checkpoint import read_checkpoint
from covidqu.train import checks
from covidqu.train.run import build, train

from pipeline_helpers import QUICK, TINY, compose_config, run_module


@pytest.fixture(scope="module")
def lung(trained_run: Callable[[str], Path]) -> Path:
    """The best checkpoint of a tiny task=lung U-Net (resnet18, 32 px), shared read-only."""
    return trained_run("lung") / "checkpoints" / "best.ckpt"


def _config(root: Path, out: Path, *extra: str):
    return compose_config("train", [*TINY, f"data.root={root}", *extra], out)


def _net_state(path: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)["state_dict"]
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}


def _same(net: torch.nn.Module, source: dict[str, torch.Tensor], prefix: str) -> list[bool]:
    return [torch.equal(v, source[k]) for k, v in net.state_dict().items() if k.startswith(prefix)]


def test_an_infection_model_takes_the_lung_models_encoder_and_decoder(
    lung, synth_root, tmp_path, caplog
):
    cfg = _config(synth_root, tmp_path, "task=infection", f"encoder.weights={lung}")
    cfg.encoder.load_decoder = True
    checks.check_transfer(cfg)  # fits: nothing refused up front
    with caplog.at_level(logging.INFO, logger="covidqu.train.run"):
        _, module = build(cfg)
    source = _net_state(lung)
    assert all(_same(module.net, source, "encoder.")) and _same(module.net, source, "encoder.")
    assert all(_same(module.net, source, "decoder.")) and _same(module.net, source, "decoder.")
    # another target (lung -> infection): the head is left at random though its shapes agree
    assert not any(_same(module.net, source, "segmentation_head."))

    init = module.recipe["init"]
    assert init["encoder.weights"] == str(lung) and init["encoder.load_decoder"] is True
    record = init["from_checkpoint"]
    assert (record["checkpoint"], record["task"], record["target"]) == (str(lung), "lung", "lung")
    n_dec = sum(k.startswith("decoder.") for k in module.net.state_dict())
    assert record["loaded"]["decoder"]["tensors"] == n_dec > 0
    assert record["loaded"]["head"] == {"tensors": 0, "parameters": 0}
    head = module.net.segmentation_head
    assert record["random"]["head"]["parameters"] == sum(p.numel() for p in head.parameters())

    (line,) = [r.getMessage() for r in caplog.records if "initialised from" in r.getMessage()]
    assert f"initialised from {lung} (task=lung, target=lung, model=unet)" in line
    assert f"decoder {n_dec} tensors" in line
    assert "left at random head 2 tensors" in line
    assert "trained for target lung, this run's is infection" in line


def test_the_same_target_takes_the_head_too(lung, synth_root, tmp_path):
    cfg = _config(synth_root, tmp_path, f"encoder.weights={lung}", "encoder.load_decoder=true")
    _, module = build(cfg)
    source = _net_state(lung)
    assert all(_same(module.net, source, ""))  # encoder, decoder and head: all of it
    assert module.recipe["init"]["from_checkpoint"]["random"]["head"]["tensors"] == 0


def test_without_load_decoder_only_the_encoder_is_taken(lung, synth_root, tmp_path):
    _, module = build(_config(synth_root, tmp_path, f"encoder.weights={lung}"))
    source = _net_state(lung)
    assert all(_same(module.net, source, "encoder."))
    assert not any(_same(module.net, source, "decoder.blocks.0.conv1.0.weight"))
    assert module.recipe["init"] == {
        "encoder.weights": str(lung),
        "encoder.load_decoder": False,
        "from_checkpoint": None,
    }


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        # another architecture: the U-Net's decoder layers are absent from an FPN
        (
            ["model=fpn"],
            [
                "model.arch: 'unet' there, 'fpn' here",
                "in the checkpoint only: decoder.blocks.0.conv1.0.weight (256, 768, 3, 3)",
                "layers in this network only: decoder.p2.skip_conv.bias (256,); "
                "decoder.p2.skip_conv.weight (256, 64, 1, 1)",
            ],
        ),
        # other decoder_channels: the same layers, other shapes, both given
        (
            ["model.decoder_channels=[128,64,32,16,8]"],
            ["checkpoint (256, 768, 3, 3), model (128, 768, 3, 3)", "model.decoder_channels"],
        ),
    ],
    ids=["unet-into-fpn", "other-decoder-channels"],
)
def test_a_decoder_that_does_not_fit_is_refused_up_front(lung, synth_root, tmp_path, extra, named):
    cfg = _config(synth_root, tmp_path, f"encoder.weights={lung}", *extra)
    cfg.encoder.load_decoder = True
    with pytest.raises(ConfigError) as err:
        checks.check_transfer(cfg)
    text = str(err.value)
    for part in [*named, "encoder.load_decoder=true: the decoder of", "drop encoder.load_decoder"]:
        assert part in text, text
    with pytest.raises(ConfigError, match="does not fit"):  # and at build, where not checked
        build(cfg)


def test_the_command_refuses_a_misfit_with_exit_2_before_its_folder_exists(
    lung, synth_root, tmp_path
):
    run_dir = tmp_path / "never"
    args = [*QUICK, f"data.root={synth_root}", "task=infection", "model=fpn"]
    args += [f"encoder.weights={lung}", "encoder.load_decoder=true", f"hydra.run.dir={run_dir}"]
    proc = run_module("covidqu.train", args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: encoder.load_decoder=true: the decoder of" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ("null", ConfigError, r"weights=null is random initialisation: set encoder\.weights=RUN/"),
        ("imagenet", ConfigError, r"encoder\.weights=imagenet is no file"),
        ("{plain}", CheckpointError, r"takes the decoder of a covidqu checkpoint: .*not written"),
    ],
    ids=["null", "named", "plain-state-dict"],
)
def test_load_decoder_needs_a_covidqu_checkpoint(synth_root, tmp_path, weights, error, message):
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    cfg = _config(synth_root, tmp_path, f"encoder.weights={weights.format(plain=plain)}")
    cfg.encoder.load_decoder = True
    with pytest.raises(error, match=message):
        checks.check_transfer(cfg)


def test_load_decoder_is_refused_for_a_classifier(lung, synth_root, tmp_path):
    cfg = _config(synth_root, tmp_path, "task=classify", f"encoder.weights={lung}")
    cfg.encoder.load_decoder = True
    with pytest.raises(UserError, match="needs a segmentation network with a decoder"):
        checks.check_transfer(cfg)


def test_train_infection_from_the_lung_models_checkpoint(lung, synth_root, tmp_path):
    """The documented recipe, end to end: the run's own checkpoint says where it started."""
    args = [*QUICK, f"data.root={synth_root}", "task=infection", f"encoder.weights={lung}"]
    train(compose_config("train", [*args, "encoder.load_decoder=true"], tmp_path))
    recipe = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["covidqu"]
    assert recipe["init"]["from_checkpoint"]["task"] == "lung"
    assert recipe["init"]["from_checkpoint"]["loaded"]["decoder"]["tensors"] > 0
