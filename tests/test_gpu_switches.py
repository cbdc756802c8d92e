"""The switches that speed a GPU up: ``module.channels_last`` and ``module.compile``.

``module.channels_last=null`` (the default) puts the network in channels-last memory format
where the module runs on a CUDA device and leaves it contiguous elsewhere; ``true`` / ``false``
force it. The conversion itself is plain tensor work, so it is checked here on the CPU, asking
the module to follow a CUDA device. ``module.compile=true`` compiles the network at fit start:
its outputs, loss and gradients must be the eager network's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from covidqu.errors import ConfigError
from covidqu.models.base import channels_last_on
from covidqu.models.checkpoint import load_module, read_checkpoint
from covidqu.models.losses import BCELoss, DiceLoss, WeightedSum
from covidqu.models.metrics import SegmentationMetrics
from covidqu.models.networks import build_segmentation_model
from covidqu.models.segmentation import SegmentationModule
from covidqu.runtime.checks import check_values

from pipeline_helpers import TINY, compose_config

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def tiny_module(**kwargs) -> SegmentationModule:
    """A U-Net of three stages, random weights, for 32-64 px inputs."""
    torch.manual_seed(0)
    net = build_segmentation_model(
        "unet", "resnet18", None, encoder_depth=3, decoder_channels=[32, 16, 8]
    )
    loss = WeightedSum({"dice": DiceLoss("binary"), "bce": BCELoss("binary")})
    return SegmentationModule(net=net, loss=loss, metrics=SegmentationMetrics(), **kwargs)


def convs(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4]


def channels_last(module: torch.nn.Module) -> bool:
    """Every convolution weight in channels-last format. Where a weight has one input channel
    or a 1x1 kernel both formats are the same strides: the others must differ."""
    weights = convs(module)
    assert weights, "the network has no convolution"
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in weights) and any(
        not w.is_contiguous() for w in weights
    )


def contiguous(module: torch.nn.Module) -> bool:
    weights = convs(module)
    assert weights, "the network has no convolution"
    return all(w.is_contiguous() for w in weights)


@pytest.mark.parametrize(
    "setting, device, want",
    [
        (None, CUDA, True),
        (None, "cuda:1", True),
        (None, CPU, False),
        (None, "cpu", False),
        (True, CPU, True),
        (True, CUDA, True),
        (False, CUDA, False),
        (False, CPU, False),
    ],
)
def test_channels_last_is_on_by_default_on_cuda_only(setting, device, want):
    assert channels_last_on(setting, device) is want


def test_the_default_converts_the_network_once_the_device_is_known():
    module = tiny_module()  # channels_last=None
    assert module.hparams.channels_last is None
    module.setup("fit")  # outside a Trainer the device is the CPU's
    assert contiguous(module.net) and not module.runs_channels_last

    x = torch.randn(2, 1, 32, 32)
    module.eval()
    eager = module(x)
    # a Trainer on a GPU: Lightning sets the module's device to the strategy's root device,
    # then calls setup, before it moves anything
    module._device = torch.device("cuda", 0)
    module.setup("fit")
    assert channels_last(module.net) and module.runs_channels_last
    module._device = CPU
    # the same network in another layout: the same outputs
    torch.testing.assert_close(module.net(x.contiguous(memory_format=torch.channels_last)), eager)
    # moved back to the CPU outside a Trainer (predict, analyze): the first forward follows
    module(x)
    assert contiguous(module.net) and not module.runs_channels_last


def test_the_averaged_copy_of_ema_true_has_the_layout_of_the_training_device(monkeypatch):
    """Lightning's weight averaging copies the module in its own setup, before the module's
    setup converts the network: the copy must still be made in the training device's layout.
    Here the CPU plays a CUDA device (where the default turns channels-last on)."""
    from types import SimpleNamespace

    import covidqu.models.base as base
    from covidqu.runtime.callbacks import EMA

    monkeypatch.setattr(base, "channels_last_on", lambda setting, device: setting is not False)
    module = tiny_module()  # channels_last=None: the device decides
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=CPU))
    ema = EMA(decay=0.9)
    ema.setup(trainer, module, "fit")
    assert channels_last(ema._average_model.module.net)
    module.setup("fit")
    assert channels_last(module.net) and module.runs_channels_last


@pytest.mark.parametrize("setting, layout", [(True, channels_last), (False, contiguous)])
def test_true_and_false_force_the_layout_on_any_device(setting, layout):
    module = tiny_module(channels_last=setting)
    assert layout(module.net)  # from the start, as before there was a default
    for device in (CUDA, CPU, CUDA):
        module.follow_device(device)
        assert layout(module.net)


def test_channels_last_takes_only_true_false_or_null():
    with pytest.raises(ValueError, match=r"module.channels_last must be true, false or null"):
        tiny_module(channels_last="yes")


@pytest.mark.parametrize(
    "value, said",
    [
        (
            "module.channels_last=maybe",
            "module.channels_last='maybe': must be null (on where the module runs on a CUDA "
            "device), true or false, e.g. module.channels_last=null",
        ),
        ("module.compile=1", "module.compile=1: must be true or false, e.g. module.compile=true"),
    ],
)
def test_bad_switch_values_are_refused_before_anything_runs(value, said, tmp_path):
    cfg = compose_config("train", [*TINY, value], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_values(cfg, "train")
    assert said in str(err.value)


def test_the_default_trains_and_predicts_contiguous_on_the_cpu(trained_run):
    """A run trained on the CPU with the default: its checkpoint holds contiguous weights and
    the recipe's null, and the module loaded from it stays contiguous as it predicts."""
    ckpt_path = trained_run("lung") / "checkpoints" / "best.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["hyper_parameters"]["channels_last"] is None
    assert ckpt["covidqu"]["module_kwargs"]["channels_last"] is None
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("net.") and v.dim() == 4]
    assert weights and all(w.is_contiguous() for w in weights)

    module = load_module(ckpt_path)
    module(torch.zeros(1, 1, 32, 32))
    assert contiguous(module.net) and not module.runs_channels_last


@pytest.mark.slow  # compiling takes about a minute on two CPU cores (a cold compile cache)
def test_the_compiled_network_computes_what_the_eager_one_does():
    module = tiny_module(compile=True)
    eager = copy.deepcopy(module)
    module.setup("fit")
    assert isinstance(module.net, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    batch = {"mask": mask.float()}

    # evaluation: the same logits
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), eager.eval()(x), atol=1e-4, rtol=1e-4)

    # a training step: the same logits, loss and gradients. In float64: in float32 the
    # gradients of this random network through batch norm on 4 images differ by up to 1 % from
    # summing in another order, which would hide a real difference; in float64 by 1e-14.
    x, batch["mask"] = x.double(), batch["mask"].double()
    steps = []
    for m in (module.double().train(), eager.double().train()):
        logits = m(x)
        loss, _ = m.loss_of(logits, batch)  # the losses compute in float32
        loss.backward()
        steps.append((logits.detach(), loss.detach()))
    (logits, loss), (want_logits, want_loss) = steps
    torch.testing.assert_close(logits, want_logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss, want_loss)
    for (name, got), want in zip(module.named_parameters(), eager.parameters(), strict=True):
        if want.grad is None:  # the encoder's stages past encoder_depth are left unused
            assert got.grad is None, name
            continue
        error = ((got.grad - want.grad).norm() / want.grad.norm().clamp_min(1e-30)).item()
        assert error < 1e-8, f"{name}: the compiled gradient is {error:.1e} off the eager one"


@pytest.mark.parametrize("setting, layout", [(False, contiguous), (True, channels_last)])
def test_checkpoints_that_forced_the_switch_still_load(trained_run, tmp_path, setting, layout):
    """Checkpoints written when ``module.channels_last`` was ``false`` by default (or ``true``
    by choice) load as before, with ``weights_only=True``, and keep their setting."""
    ckpt = read_checkpoint(trained_run("lung") / "checkpoints" / "best.ckpt")
    ckpt["covidqu"]["module_kwargs"]["channels_last"] = setting
    ckpt["hyper_parameters"]["channels_last"] = setting
    old = tmp_path / "old.ckpt"
    torch.save({k: ckpt[k] for k in ("state_dict", "covidqu", "hyper_parameters")}, old)

    module = load_module(old)
    assert module.channels_last is setting
    probabilities = module.predict_probabilities(torch.zeros(1, 1, 32, 32))
    assert layout(module.net) and torch.isfinite(probabilities).all()
