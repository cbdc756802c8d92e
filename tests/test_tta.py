"""Test-time augmentation (``tta=none|flip|flip_scale``): the averages by hand, and through
``eval``, ``predict`` and ``analyze``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covidqu.analyze import run as analysis
from covidqu.analyze import stages as stage_lib
from covidqu.data.transforms import build_transform
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.eval.split import datamodule_for
from covidqu.models.checkpoint import load_module
from covidqu.models.metrics import SegmentationMetrics
from covidqu.models.segmentation import SegmentationModule
from covidqu.models.tta import scaled_side, tta_probabilities
from covidqu.predict.run import predict, prepare
from covidqu.runtime.checks import check_values

from pipeline_helpers import compose_config, read_csv, read_metrics


class _Skewed(nn.Module):
    """A seeded convolution plus a left-to-right ramp: nothing about it is mirror-symmetric."""

    def __init__(self, channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(1, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.linspace(-2.0, 1.0, x.shape[-1])


class _SkewedClassifier(nn.Module):
    """Three class logits that depend on where in the image things are (any input size)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.net = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(16, 3),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50 * self.net(x)  # confident: averaging logits or probabilities then differs


def _sigmoid(net: nn.Module):
    return lambda x: torch.sigmoid(net(x))


def _softmax(net: nn.Module):
    return lambda x: torch.softmax(net(x), dim=1)


def _mirror_mean(prob, x: torch.Tensor, pixels: bool = True) -> torch.Tensor:
    """By hand: the model on the image and on its mirror, the mirror's output mirrored back."""
    mirrored = prob(torch.flip(x, dims=[3]))
    if pixels:
        mirrored = torch.flip(mirrored, dims=[3])
    return (prob(x) + mirrored) / 2


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- the averages, by hand ----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@torch.no_grad()
def test_flip_is_the_mean_of_the_image_and_its_mirror_mirrored_back(channels: int) -> None:
    net = _Skewed(channels)
    to_probs = nn.Sigmoid() if channels == 1 else nn.Softmax(dim=1)
    x = _image((2, 1, 32, 48))
    got = tta_probabilities(net, to_probs, x, "flip")
    prob = _sigmoid(net) if channels == 1 else _softmax(net)
    assert got.shape == (2, channels, 32, 48)
    torch.testing.assert_close(got, _mirror_mean(prob, x), atol=1e-6, rtol=1e-5)
    # and it is neither the plain prediction nor the mirror left unmapped
    assert not torch.allclose(got, prob(x), atol=1e-3)
    assert not torch.allclose(got, (prob(x) + prob(x.flip(-1))) / 2, atol=1e-3)
    torch.testing.assert_close(tta_probabilities(net, to_probs, x, "none"), prob(x))


def test_rescaled_sides_are_multiples_of_32() -> None:
    assert [scaled_side(256, s) for s in (0.75, 1.0, 1.25)] == [192, 256, 320]
    assert [scaled_side(128, s) for s in (0.75, 1.0, 1.25)] == [96, 128, 160]
    assert [scaled_side(32, s) for s in (0.75, 1.25)] == [32, 32]  # never below 32
    assert scaled_side(50, 1.0) == 50  # the input itself is never resized


@torch.no_grad()
def test_flip_scale_averages_the_flips_at_each_scale_at_the_input_size() -> None:
    net = _Skewed(3)
    prob = _softmax(net)
    x = _image((2, 1, 128, 128))
    got = tta_probabilities(net, nn.Softmax(dim=1), x, "flip_scale")
    assert got.shape == (2, 3, 128, 128)
    expected = []
    for side in (96, 128, 160):
        xs = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        p = _mirror_mean(prob, xs)
        expected.append(F.interpolate(p, size=(128, 128), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got, sum(expected) / 3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2, 128, 128))  # still probabilities
    assert not torch.allclose(got, tta_probabilities(net, nn.Softmax(dim=1), x, "flip"), atol=1e-3)


@torch.no_grad()
def test_classification_tta_averages_class_probabilities() -> None:
    net = _SkewedClassifier()
    prob = _softmax(net)
    x = _image((3, 1, 64, 64))
    got = tta_probabilities(net, nn.Softmax(dim=1), x, "flip")
    torch.testing.assert_close(got, _mirror_mean(prob, x, pixels=False), atol=1e-6, rtol=1e-5)
    # probabilities are averaged, not logits
    assert not torch.allclose(got, torch.softmax((net(x) + net(x.flip(-1))) / 2, 1), atol=1e-4)
    scaled = tta_probabilities(net, nn.Softmax(dim=1), x, "flip_scale")
    expected = sum(
        _mirror_mean(prob, F.interpolate(x, size=(s, s), mode="bilinear"), pixels=False)
        # 48 and 80 px rounded half up to multiples of 32: 64 (counted once) and 96
        for s in (64, 96)
    )
    torch.testing.assert_close(scaled, expected / 2, atol=1e-6, rtol=1e-5)


def _segmentation_module(target: str = "lung", net: nn.Module | None = None) -> SegmentationModule:
    return SegmentationModule(
        net=net or _Skewed(),
        loss=None,
        metrics=SegmentationMetrics(),
        recipe={
            "task": {"kind": "segmentation"},
            "preprocess": {"image_size": 32, "mean": 0.449, "std": 0.226, "target": target},
        },
    ).eval()


@torch.no_grad()
def test_the_test_step_scores_the_averaged_probabilities() -> None:
    module = _segmentation_module()
    x = _image((2, 1, 32, 32))
    torch.testing.assert_close(module.test_logits(x), module(x))  # none: the network itself
    module.tta = "flip"
    scored = module.probabilities(module.test_logits(x))
    torch.testing.assert_close(scored, _mirror_mean(_sigmoid(module.net), x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.predict_probabilities(x), scored, atol=1e-5, rtol=1e-4)


def test_an_unknown_tta_is_refused(tmp_path: Path) -> None:
    module = _segmentation_module()
    with pytest.raises(ConfigError, match=r"tta='mirror'.*none, flip, flip_scale"):
        module.tta = "mirror"
    with pytest.raises(ConfigError, match="tta='mirror'"):
        predict(tmp_path / "model.ckpt", tmp_path, tmp_path / "out", tta="mirror")
    for command in ("eval", "predict", "analyze"):
        cfg = compose_config(command, ["tta=mirror"], tmp_path)
        with pytest.raises(ConfigError, match=r"tta='mirror'.*none, flip or flip_scale"):
            check_values(cfg, command)


# -- through the commands ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lung_ckpt(trained_run: Callable[[str], Path]) -> Path:
    """A tiny lung model (shared, read-only)."""
    return trained_run("lung") / "checkpoints" / "best.ckpt"


def _eval(ckpt: Path, root: Path, out: Path, tta: str) -> dict:
    overrides = [
        f"ckpt_path={ckpt}",
        f"data.root={root}",
        "data.num_workers=0",
        "num_overlays=0",
        "trainer.accelerator=cpu",
        f"tta={tta}",
        "postprocess=none",  # the network's masks, as the figures by hand below
    ]
    evaluate(compose_config("eval", overrides, out))
    return read_metrics(out)


@torch.no_grad()
def test_eval_with_flip_scores_the_mirror_mean(lung_ckpt: Path, synth_root: Path, tmp_path):
    flip = _eval(lung_ckpt, synth_root, tmp_path / "flip", "flip")
    plain = _eval(lung_ckpt, synth_root, tmp_path / "none", "none")
    assert flip["tta"] == "flip" and plain["tta"] == "none"
    # each image's dice, by hand, from the mean of the model on it and on its mirror
    module = load_module(lung_ckpt)
    datamodule = datamodule_for(module.recipe["preprocess"], synth_root, num_workers=0)
    datamodule.setup("test")
    expected, differs = {}, False
    for batch in datamodule.dataloader("test"):
        prob = _sigmoid(module)
        mean = _mirror_mean(prob, batch["image"])
        differs |= not torch.equal(mean > module.threshold, prob(batch["image"]) > module.threshold)
        pred, truth = (mean[:, 0] > module.threshold), batch["mask"][:, 0] > 0.5
        inter = (pred & truth).sum(dim=(1, 2)).float()
        total = (pred.sum(dim=(1, 2)) + truth.sum(dim=(1, 2))).float()
        for i, image_id in enumerate(batch["id"]):
            expected[image_id] = float(2 * inter[i] / total[i]) if total[i] else 1.0
    assert differs, "the model is mirror-symmetric on these images: the test shows nothing"
    rows = {r["id"]: float(r["dice"]) for r in read_csv(tmp_path / "flip" / "per_image.csv")}
    assert rows == pytest.approx(expected, abs=1e-4)
    mean_dice = sum(expected.values()) / len(expected)
    assert flip["test/dice_image"] == pytest.approx(mean_dice, abs=1e-5)


def test_predict_with_flip_writes_masks_of_the_averaged_probabilities(tmp_path, monkeypatch):
    module = _segmentation_module()
    monkeypatch.setattr("covidqu.predict.run.load_model", lambda path, map_location="cpu": module)
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (40, 48), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(tmp_path / "cxr.png"), image)
    masks = {}
    for tta in ("none", "flip"):
        rows = predict(tmp_path / "m.ckpt", tmp_path / "cxr.png", tmp_path / tta, tta=tta)
        assert rows[0]["tta"] == tta
        masks[tta] = cv2.imread(str(tmp_path / tta / "cxr_mask.png"), cv2.IMREAD_UNCHANGED)
    with torch.no_grad():
        x = prepare(image, build_transform(32), 0.449, 0.226)[None]
        probs = _mirror_mean(_sigmoid(module.net), x)[0].numpy()
    up = cv2.resize(probs[0], (48, 40), interpolation=cv2.INTER_LINEAR)
    sure = np.abs(up - module.threshold) > 1e-4  # pixels a rounding error cannot tip
    assert np.array_equal((masks["flip"] > 0)[sure], (up > module.threshold)[sure])
    assert not np.array_equal(masks["flip"], masks["none"])


def test_analyze_with_flip_records_it_and_segments_the_mirror_mean(
    synth_root, tmp_path, monkeypatch
):
    stages = {"lung_ckpt": _segmentation_module("lung"), "infection_ckpt": None}
    stages["infection_ckpt"] = _segmentation_module("infection", _Skewed(seed=3))
    monkeypatch.setattr(
        stage_lib, "load_model", lambda path, map_location="cpu", key="": stages[key]
    )
    found = {}
    for tta in ("none", "flip"):
        overrides = [
            "lung_ckpt=lung.ckpt",
            "infection_ckpt=inf.ckpt",
            f"data.root={synth_root}",
            "detect.threshold=1.0",
            "detect.n_boot=10",
            "trainer.accelerator=cpu",
            f"tta={tta}",
        ]
        analysis.analyze(compose_config("analyze", overrides, tmp_path / tta))
        found[tta] = (read_metrics(tmp_path / tta), read_csv(tmp_path / tta / "analysis.csv"))
    assert found["flip"][0]["tta"] == "flip" and found["none"][0]["tta"] == "none"
    lung_dice = {k: [r["lung_dice"] for r in rows] for k, (_, rows) in found.items()}
    assert lung_dice["flip"] != lung_dice["none"]
    # the stages' masks are those of the mirror mean
    image = np.asarray(_image((40, 48)).sigmoid() * 255, dtype=np.uint8)
    lung_module, infection_module = stages["lung_ckpt"], stages["infection_ckpt"]
    lung_module.tta = infection_module.tta = "flip"
    both = stage_lib.Stages(lung=lung_module, infection=infection_module)
    ((lung, _),) = stage_lib.segment(both, [image], "cpu")
    with torch.no_grad():
        x = prepare(image, build_transform(32), 0.449, 0.226)[None]
        probs = _mirror_mean(_sigmoid(lung_module.net), x)[0, 0].numpy()
    up = cv2.resize(probs, (48, 40), interpolation=cv2.INTER_LINEAR)
    sure = np.abs(up - 0.5) > 1e-4
    assert np.array_equal(lung[sure], (up > 0.5)[sure])
