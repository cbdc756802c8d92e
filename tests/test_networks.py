"""Network builders: every architecture, encoder and model config builds and trains on CPU at
tiny sizes; weights come from nowhere (null), a local file, or fail loudly when a download can't
happen. No test touches the network."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import huggingface_hub.constants
import hydra.utils
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from covidqu.models.networks import (
    WeightsUnavailableError,
    build_classifier,
    build_segmentation_model,
)
from covidqu.models.weights import smp_weights, timm_pretrained_name

from pipeline_helpers import TINY, compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
ENCODER_CONFIGS = sorted((CONF / "encoder").glob("*.yaml"))
MODEL_CONFIGS = sorted((CONF / "model").glob("*.yaml"))
#: Every segmentation architecture smp has: its registry is the only list of them.
ARCHITECTURES = list(smp.MODEL_ARCHITECTURES_MAPPING)
#: The names users type (model=<name>), each a config file in conf/model/.
MODEL_NAMES = {"unet", "unetplusplus", "fpn", "deeplabv3", "deeplabv3plus", "manet", "linknet"}
MODEL_NAMES |= {"pspnet", "pan", "upernet", "segformer", "dpt"}

#: A second, different encoder family per architecture, besides resnet18 (dpt: timm encoders).
SECOND_ENCODER = {
    "unet": "mobilenet_v2",
    "unetplusplus": "efficientnet-b0",
    "fpn": "mobilenet_v2",
    "deeplabv3": "efficientnet-b0",
    "deeplabv3plus": "mobilenet_v2",
    "manet": "efficientnet-b0",
    "linknet": "mobilenet_v2",
    "pspnet": "efficientnet-b0",
    "pan": "mobilenet_v2",
    "upernet": "tu-convnext_atto",
    "segformer": "mit_b0",
}
#: PAN needs 8 x its output stride (16): 64 px can't work with its defaults.
SIZE = {"pan": 128}
DPT_ENCODERS = ("tu-vit_tiny_patch16_224", "tu-convnext_atto")

ARCH_CASES = [
    (arch, encoder)
    for arch in ARCHITECTURES
    for encoder in (DPT_ENCODERS if arch == "dpt" else ("resnet18", SECOND_ENCODER[arch]))
]


def first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def forward_backward(model: nn.Module, size: int, in_channels: int = 1) -> torch.Tensor:
    model.train()
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


# --------------------------------------------------------------------------------------------
# Architectures x encoders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "encoder"), ARCH_CASES, ids=[f"{a}-{e}" for a, e in ARCH_CASES])
def test_architecture_trains_on_gray_input(arch: str, encoder: str) -> None:
    torch.manual_seed(0)
    kwargs = (
        {"decoder_readout": "ignore"} if encoder == "tu-convnext_atto" and arch == "dpt" else {}
    )
    model = build_segmentation_model(arch, encoder, encoder_weights=None, classes=3, **kwargs)
    size = SIZE.get(arch, 64)

    out = forward_backward(model, size)

    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()
    grad = first_conv(model.encoder).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert first_conv(model.encoder).in_channels == 1


@pytest.mark.parametrize("classes", [1, 3])
def test_unet_output_channels(classes: int) -> None:
    model = build_segmentation_model("unet", "resnet18", None, in_channels=1, classes=classes)
    assert forward_backward(model, 64).shape == (2, classes, 64, 64)


def test_unet_takes_sizes_not_divisible_by_32() -> None:
    model = build_segmentation_model("unet", "resnet18", None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 48, 80)).shape == (1, 1, 48, 80)


@pytest.mark.parametrize("arch", ["UnetPlusPlus", "FPN", "deeplabv3PLUS", " Unet "])
def test_smp_class_names_are_accepted(arch: str) -> None:
    model = build_segmentation_model(arch, "resnet18", None)
    assert type(model).__name__.lower() == arch.strip().lower()


def test_pan_refuses_small_images_clearly_and_works_shallower() -> None:
    model = build_segmentation_model("pan", "resnet18", None)
    with pytest.raises(ValueError, match=r"at least 128 x 128.*data\.image_size>=128"):
        model(torch.randn(2, 1, 64, 64))
    shallow = build_segmentation_model("pan", "resnet18", None, encoder_depth=3)
    assert forward_backward(shallow, 64).shape == (2, 1, 64, 64)


def test_dpt_needs_a_timm_encoder() -> None:
    with pytest.raises(ValueError, match=r"model=dpt.*tu-.*encoder\.name=resnet18"):
        build_segmentation_model("dpt", "resnet18", None)


def test_dpt_vit_runs_at_other_sizes() -> None:
    model = build_segmentation_model("dpt", "tu-vit_tiny_patch16_224", None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 96)).shape == (1, 1, 96, 96)


def test_kwargs_reach_smp_and_timm() -> None:
    model = build_segmentation_model(
        "unet",
        "resnet18",
        None,
        decoder_channels=[64, 32, 32, 16, 16],
        decoder_attention_type="scse",
    )
    assert model.segmentation_head[0].in_channels == 16
    assert forward_backward(model, 64).shape == (2, 1, 64, 64)
    timm_encoded = build_segmentation_model("fpn", "tu-resnet18", None, drop_path_rate=0.1)
    assert timm_encoded.encoder.model.layer4[1].drop_path.drop_prob == pytest.approx(0.1)


def test_options_smp_would_ignore_are_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.decoder_chanels"):
        build_segmentation_model("unet", "resnet18", None, decoder_chanels=[8, 8, 8, 8, 8])
    with pytest.raises(ValueError, match=r"model\.activation"):
        build_segmentation_model("unet", "resnet18", None, activation="sigmoid")


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: build_segmentation_model("unte", "resnet18", None), r"model=unte.*unet, "),
        (
            lambda: build_segmentation_model("unet", "resnet19", None),
            r"encoder\.name=resnet19.*tu-",
        ),
        (lambda: build_segmentation_model("unet", "tu-no_such_net", None), r"encoder\.name=tu-"),
        (lambda: build_segmentation_model("unet", "efficientnet_b0", None), r"tu-efficientnet_b0"),
        (lambda: build_classifier("no_such_net", None), r"model\.name=no_such_net.*list_models"),
        (
            lambda: build_segmentation_model("unetplusplus", "mit_b0", None),
            r"model=unetplusplus.*encoder\.name=mit_b0",
        ),
        (lambda: build_segmentation_model("unet", "resnet18", "nope"), r"encoder\.weights=nope"),
        (lambda: build_classifier("resnet18", "nope"), r"encoder\.weights=nope.*tv_in1k"),
    ],
    ids=[
        "arch",
        "encoder",
        "timm-encoder",
        "timm-name-as-encoder",
        "classifier",
        "combo",
        "w",
        "tag",
    ],
)
def test_unknown_names_name_the_config_key(build, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build()


# --------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "run"),
    [
        ("resnet18", {}, True),
        ("densenet121", {}, False),
        ("efficientnet_b0", {"drop_rate": 0.2}, True),
        ("convnext_atto", {}, True),
        ("vit_small_patch16_224", {"img_size": 64}, True),
    ],
)
def test_timm_classifiers(name: str, kwargs: dict, run: bool) -> None:
    model = build_classifier(name, weights=None, in_chans=1, num_classes=3, **kwargs)
    assert first_conv(model).in_channels == 1
    if run:
        out = forward_backward(model, 64)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert first_conv(model).weight.grad is not None


@pytest.mark.parametrize(
    ("name", "timm_name"),
    [
        ("efficientnet-b0", "efficientnet_b0"),
        ("mobilenet_v2", "mobilenetv2_100"),
        ("tu-resnet18", "resnet18"),
        ("tu-convnext_atto", "convnext_atto"),
        ("resnet34", "resnet34"),
    ],
)
def test_classifier_accepts_smp_encoder_names(name: str, timm_name: str) -> None:
    model = build_classifier(name, weights=None)
    assert model.pretrained_cfg["architecture"] == timm_name


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ENCODER_CONFIGS, ids=[p.stem for p in ENCODER_CONFIGS])
def test_encoder_config(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"name", "weights", "timm_name"}
    # The named weights exist for both uses (checked offline, without downloading).
    smp_weights(cfg.name, cfg.weights)
    timm_pretrained_name(cfg.timm_name, cfg.weights)

    unet = build_segmentation_model("unet", cfg.name, None)
    classifier = build_classifier(cfg.timm_name, None)
    assert first_conv(unet.encoder).in_channels == 1
    unet.eval()
    classifier.eval()
    with torch.no_grad():
        assert unet(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
        assert classifier(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_encoder_configs_are_complete() -> None:
    expected = {"resnet18", "resnet34", "resnet50", "densenet121", "densenet161", "densenet201"}
    expected |= {f"efficientnet-b{i}" for i in range(5)} | {"mobilenet_v2", "timm"}
    assert expected <= {p.stem for p in ENCODER_CONFIGS}


def test_model_configs_cover_every_architecture() -> None:
    archs = {OmegaConf.load(p).get("arch") for p in MODEL_CONFIGS if OmegaConf.load(p).get("arch")}
    assert archs == set(ARCHITECTURES)
    assert MODEL_NAMES | {"classifier", "convnext", "vit"} <= {p.stem for p in MODEL_CONFIGS}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.stem for p in MODEL_CONFIGS])
def test_model_config_instantiates(path: Path) -> None:
    raw = OmegaConf.load(path)
    segmentation = raw._target_.endswith("build_segmentation_model")
    name = "tu-vit_tiny_patch16_224" if raw.get("arch") == "dpt" else "resnet18"
    cfg = OmegaConf.merge(
        {
            "encoder": {"name": name, "weights": None, "timm_name": "resnet18"},
            "task": {"num_outputs": 2},
            "data": {"image_size": 64},
        },
        {"model": raw},
    )
    model = hydra.utils.instantiate(cfg.model).eval()
    size = SIZE.get(raw.get("arch"), 64)
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == ((2, 2, size, size) if segmentation else (2, 3))


class UnetLite(smp.Unet):
    """Stands for an architecture that a newer smp brings: nothing of ours names it."""


def write_config(root: Path, group: str, name: str, text: str) -> str:
    """A config file in a folder of its own, and the override that adds it to Hydra's path."""
    (root / group).mkdir(parents=True, exist_ok=True)
    (root / group / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{root}]"


@pytest.mark.parametrize("arch", ["unetlite", "Linknet"])
def test_a_new_architecture_needs_only_a_config_file(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(smp.MODEL_ARCHITECTURES_MAPPING, "unetlite", UnetLite)
    searchpath = write_config(
        tmp_path / "conf",
        "model",
        "newarch",
        "_target_: covidqu.models.networks.build_segmentation_model\n"
        f"arch: {arch}\n"
        "encoder_name: ${encoder.name}\n"
        "encoder_weights: ${encoder.weights}\n"
        "in_channels: 1\n"
        "classes: ${task.num_outputs}\n",
    )
    overrides = ["task=infection", "data.target=infection_multiclass", "model=newarch"]
    cfg = compose_config("train", [*TINY, *overrides, searchpath], tmp_path / "run")

    net = hydra.utils.instantiate(cfg.model).eval()
    assert type(net) is smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()]
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_a_new_timm_encoder_needs_only_a_config_file(tmp_path: Path) -> None:
    """Any timm model is an encoder (tu-) and a classifier, its weights file loaded by timm."""
    full = timm.create_model("regnetx_002")
    weights = tmp_path / "regnetx_002.safetensors"
    save_file(full.state_dict(), weights)
    searchpath = write_config(
        tmp_path / "conf",
        "encoder",
        "regnet",
        "name: tu-regnetx_002\nweights: imagenet\ntimm_name: regnetx_002\n",
    )
    overrides = [*TINY, "encoder=regnet", f"encoder.weights={weights}", searchpath]
    stem = gray(full.stem.conv.weight)

    cfg = compose_config("train", [*overrides, "model=fpn"], tmp_path)
    net = hydra.utils.instantiate(cfg.model).eval()
    assert torch.equal(net.encoder.model.stem.conv.weight, stem)
    assert torch.equal(net.encoder.model.s3.b1.conv2.conv.weight, full.s3.b1.conv2.conv.weight)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)

    cfg = compose_config("train", [*overrides, "task=classify"], tmp_path)
    classifier = hydra.utils.instantiate(cfg.model).eval()
    assert torch.equal(classifier.stem.conv.weight, stem)
    with torch.no_grad():
        assert classifier(torch.randn(2, 1, 64, 64)).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, "null", "None", "", "NULL"])
def test_no_weights_spellings_mean_random_init(weights) -> None:
    assert build_segmentation_model("unet", "resnet18", weights) is not None


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub, empty caches: any download attempt fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, on import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def assert_names_both_ways_out(err: pytest.ExceptionInfo) -> None:
    message = str(err.value)
    assert "could not be downloaded" in message
    assert "encoder.weights=null" in message
    assert "encoder.weights=/path/to/" in message


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(
    "build",
    [
        lambda: build_segmentation_model("unet", "resnet18", "imagenet"),
        lambda: build_segmentation_model("fpn", "tu-resnet18", "imagenet"),
        lambda: build_segmentation_model("unet", "tu-resnet18", "a1_in1k"),
        lambda: build_classifier("resnet18", "imagenet"),
    ],
    ids=["smp-hub", "timm-hub", "timm-tag", "classifier-hub"],
)
def test_unavailable_download_fails_loudly(build) -> None:
    with pytest.raises(WeightsUnavailableError) as err:
        build()
    assert_names_both_ways_out(err)


@pytest.mark.usefixtures("offline")
def test_unreachable_url_download_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("host unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    # Weights served from a URL rather than the Hugging Face hub go through torch.hub.
    overlay = {"hf_hub_id": None, "url": "https://example.invalid/resnet18.pth"}
    with pytest.raises(WeightsUnavailableError, match="host unreachable") as err:
        build_classifier("resnet18", "imagenet", pretrained_cfg_overlay=overlay)
    assert_names_both_ways_out(err)


@pytest.mark.usefixtures("offline")
def test_bad_option_with_weights_is_a_config_error_not_a_download_error() -> None:
    with pytest.raises(ValueError, match=r"model\.name=resnet18"):
        build_classifier("resnet18", "imagenet", no_such_option=1)


@pytest.fixture(scope="module")
def rgb_resnet18() -> dict[str, torch.Tensor]:
    """A randomly initialised 3-channel torchvision ResNet-18, fc head included."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def gray(weight: torch.Tensor) -> torch.Tensor:
    return weight.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
@pytest.mark.parametrize("form", ["plain.pth", "wrapped.ckpt", "plain.safetensors"])
def test_encoder_weights_from_file(
    encoder: str, form: str, rgb_resnet18: dict, tmp_path: Path
) -> None:
    path = tmp_path / form
    if form == "wrapped.ckpt":
        wrapped = {f"module.{k}": v for k, v in rgb_resnet18.items()}
        torch.save({"state_dict": wrapped, "epoch": 3}, path)
    elif form.endswith(".safetensors"):
        save_file(rgb_resnet18, path)
    else:
        torch.save(rgb_resnet18, path)

    model = build_segmentation_model("unet", encoder, str(path))

    net = model.encoder.model if encoder.startswith("tu-") else model.encoder
    assert net.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(net.conv1.weight, gray(rgb_resnet18["conv1.weight"]))
    assert torch.equal(net.layer3[1].conv2.weight, rgb_resnet18["layer3.1.conv2.weight"])
    assert torch.equal(net.bn1.running_var, rgb_resnet18["bn1.running_var"])


@pytest.mark.parametrize("encoder", ["densenet121", "efficientnet-b0", "mobilenet_v2"])
def test_native_encoder_weights_round_trip(encoder: str, tmp_path: Path) -> None:
    """An encoder's own state dict initialises the same encoder, whatever smp overrides."""
    trained = build_segmentation_model("unet", encoder, None).encoder
    path = tmp_path / "encoder.pth"
    torch.save(trained.state_dict(), path)

    loaded = build_segmentation_model("fpn", encoder, path).encoder.state_dict()
    assert loaded.keys() == trained.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


def test_classifier_weights_from_file(rgb_resnet18: dict, tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(rgb_resnet18, path)

    model = build_classifier("resnet18", path, in_chans=1, num_classes=3)
    assert torch.equal(model.conv1.weight, gray(rgb_resnet18["conv1.weight"]))
    assert torch.equal(model.layer4[0].conv1.weight, rgb_resnet18["layer4.0.conv1.weight"])
    assert model.fc.weight.shape == (3, 512)  # the 1000-class head does not fit: left random

    same_head = build_classifier("resnet18", path, in_chans=3, num_classes=1000)
    assert torch.equal(same_head.fc.weight, rgb_resnet18["fc.weight"])
    assert torch.equal(same_head.conv1.weight, rgb_resnet18["conv1.weight"])


def test_segmentation_checkpoint_initialises_an_encoder(tmp_path: Path) -> None:
    """A whole trained network (e.g. a Lightning checkpoint) gives its encoder; decoder ignored."""
    trained = build_segmentation_model("unet", "resnet18", None)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}}, path)

    model = build_segmentation_model("fpn", "resnet18", path)
    assert torch.equal(model.encoder.conv1.weight, trained.encoder.conv1.weight)
    assert torch.equal(model.encoder.layer2[0].conv1.weight, trained.encoder.layer2[0].conv1.weight)


def test_timm_weights_fit_a_features_only_encoder(tmp_path: Path) -> None:
    """timm renames stages in features-only encoders (stages.1 -> stages_1); files still load."""
    full = timm.create_model("convnext_atto")
    path = tmp_path / "convnext_atto.pth"
    torch.save(full.state_dict(), path)

    model = build_segmentation_model("unet", "tu-convnext_atto", path)
    loaded = model.encoder.model.stages_1.blocks[0].conv_dw.weight
    assert torch.equal(loaded, full.stages[1].blocks[0].conv_dw.weight)
    assert torch.equal(model.encoder.model.stem_0.weight, gray(full.stem[0].weight))


def test_vit_weights_are_resampled_to_the_image_size(tmp_path: Path) -> None:
    full = timm.create_model("vit_tiny_patch16_224")
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)

    model = build_classifier("vit_tiny_patch16_224", path, img_size=64)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert torch.equal(model.cls_token, full.cls_token)
    assert torch.equal(model.blocks[2].attn.qkv.weight, full.blocks[2].attn.qkv.weight)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: torchvision.models.densenet121().state_dict(), "missing from the file"),
        (lambda: torchvision.models.resnet34().state_dict(), r"unexpected in the file.*layer1\.2"),
        (lambda: {"conv1.weight": torch.zeros(3)}, "missing from the file"),
    ],
    ids=["densenet", "deeper-resnet", "partial"],
)
def test_mismatching_weights_file_is_refused(make, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(make(), path)
    for build in (
        lambda: build_segmentation_model("unet", "resnet18", str(path)),
        lambda: build_segmentation_model("unet", "tu-resnet18", str(path)),
        lambda: build_classifier("resnet18", str(path)),
    ):
        with pytest.raises(ValueError, match=pattern) as err:
            build()
        assert str(path) in str(err.value)
        assert "must hold the weights of the same" in str(err.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda p: build_segmentation_model("unet", "resnet18", p),
        lambda p: build_segmentation_model("unet", "tu-resnet18", p),
        lambda p: build_classifier("resnet18", p),
    ],
    ids=["encoder", "timm-encoder", "classifier"],
)
def test_file_with_python_objects_is_refused(build, rgb_resnet18: dict, tmp_path: Path) -> None:
    """Weights load with weights_only=True: unpickling anything else could run code."""
    path = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": rgb_resnet18, "data_dir": Path("/data")}, path)
    with pytest.raises(ValueError, match=r"Python objects.*net\.state_dict\(\)") as err:
        build(path)
    assert f"encoder.weights={path}" in str(err.value)


def test_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ValueError, match="no state dict"):
        build_segmentation_model("unet", "resnet18", path)


@pytest.mark.parametrize(
    "build",
    [
        lambda p: build_segmentation_model("unet", "resnet18", p),
        lambda p: build_classifier("resnet18", p),
    ],
    ids=["encoder", "classifier"],
)
def test_missing_weights_file(build, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=r"encoder\.weights") as err:
        build(str(path))
    assert str(path) in str(err.value)
