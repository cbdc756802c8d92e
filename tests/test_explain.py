"""``explain=gradcam``: Grad-CAM heatmaps of the predicted class in ``predict`` and ``eval``, for
models with a class head; refused for segmentation-only models and bad values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from covidqu.constants import CLASSES
from covidqu.data.transforms import build_transform
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.models.checkpoint import load_module, preprocessing
from covidqu.models.explain import (
    GradCam,
    explained_classes,
    find_target_layer,
    find_token_layer,
    gradcam_for,
)
from covidqu.predict.run import predict
from covidqu.runtime.checks import preflight
from covidqu.runtime.inputs import prepare, read_input

from pipeline_helpers import compose_config, read_csv


def ckpt(trained_run: Callable[[str], Path], kind: str) -> Path:
    return trained_run(kind) / "checkpoints" / "best.ckpt"


def heat_spread(picture: np.ndarray) -> int:
    """How much the heatmap under a gray image varies: blue minus red of the JET colours is the
    same everywhere under a constant map, whatever the image."""
    blue_minus_red = picture[..., 0].astype(int) - picture[..., 2].astype(int)
    return int(np.ptp(blue_minus_red))


@pytest.fixture(scope="module")
def inputs(synth_root: Path, module_tmp: Callable[[str], Path]) -> Path:
    """One test image of each class, at sizes unlike the model's 32 px (and unlike each
    other's)."""
    folder = synth_root / "Lung Segmentation Data" / "Lung Segmentation Data" / "Test"
    out = module_tmp("explain-inputs")
    for cls, size in zip(CLASSES, ((60, 44), (48, 48), (40, 56)), strict=True):
        path = sorted((folder / cls / "images").glob("*.png"))[0]
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out / path.name), cv2.resize(image, size))
    return out


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_predict_writes_a_heatmap_of_the_predicted_class_beside_each_image(
    trained_run, inputs: Path, tmp_path: Path, tta: str
):
    rows = predict(ckpt(trained_run, "classify"), inputs, tmp_path, explain="gradcam", tta=tta)
    assert [r["status"] for r in rows] == ["ok"] * 3
    for row in rows:
        source = Path(row["file"])
        assert row["explained"] == row["predicted"]
        picture = cv2.imread(str(tmp_path / f"{source.stem}_gradcam.png"))
        assert picture.shape[:2] == cv2.imread(str(source), 0).shape  # the input's own size
        assert heat_spread(picture) > 60, "the heatmap is constant"
    assert "explained" in read_csv(tmp_path / "predictions.csv")[0]


def test_predict_writes_no_heatmap_by_default(trained_run, inputs: Path, tmp_path: Path):
    rows = predict(ckpt(trained_run, "classify"), inputs, tmp_path)
    assert not list(tmp_path.glob("*_gradcam.png"))
    assert "explained" not in rows[0]


def test_eval_of_a_multitask_model_writes_a_heatmap_per_image(
    trained_run, synth_root: Path, tmp_path: Path
):
    args = [
        f"ckpt_path={ckpt(trained_run, 'multitask')}",
        f"data.root={synth_root}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "explain=gradcam",
    ]
    metrics = evaluate(compose_config("eval", args, tmp_path))
    assert metrics["explain"] == "gradcam"
    per_image = read_csv(tmp_path / "per_image.csv")
    explained = read_csv(tmp_path / "gradcam.csv")
    assert len(per_image) == metrics["images"] == 9
    assert [r["id"] for r in explained] == [r["id"] for r in per_image]
    # the class explained is the class the class head predicted for the image
    assert [r["explained"] for r in explained] == [r["predicted"] for r in per_image]
    assert sorted(p.name for p in (tmp_path / "gradcam").iterdir()) == sorted(
        f"{r['id']}.png" for r in per_image
    )
    for row in explained:
        picture = cv2.imread(str(tmp_path / row["file"]))
        assert picture.shape == (32, 32, 3)  # the network's input, as eval scores it
        assert heat_spread(picture) > 60, f"{row['file']}: the heatmap is constant"


def batch_of(folder: Path, module) -> torch.Tensor:
    """The images of ``folder`` as the module's input batch, prepared as predict prepares them."""
    pre = preprocessing(module)
    resize = build_transform(pre["image_size"])
    images = [read_input(f) for f in sorted(folder.glob("*.png"))]
    return torch.stack([prepare(i, resize, pre["mean"], pre["std"]) for i in images])


@pytest.mark.parametrize("kind", ["classify", "multitask"])
def test_the_heatmap_depends_on_the_class_and_the_image(trained_run, inputs: Path, kind: str):
    module = load_module(ckpt(trained_run, kind))
    gradcam = gradcam_for(module, "gradcam", preprocessing(module))
    # the deepest map of more than one pixel: at 32 px the last stage is 1 x 1
    assert gradcam.layer_name.endswith("layer3")
    x = batch_of(inputs, module)
    with torch.inference_mode():  # as predict and eval run
        predicted = explained_classes(module, module.predict_probabilities(x))
        maps = {c: gradcam(x, [c] * len(x)) for c in range(len(CLASSES))}
        mine = gradcam(x, predicted)
    assert mine.shape == (3, 32, 32)
    assert all(m.std() > 0.1 for m in mine), "the map of the predicted class is constant"
    for i, c in enumerate(predicted):
        np.testing.assert_allclose(mine[i], maps[c][i], atol=1e-5)  # one image, as in a batch
        others = [np.abs(maps[c][i] - maps[k][i]).max() for k in range(len(CLASSES)) if k != c]
        assert max(others) > 0.3, "the map is the same for every class"
    c = predicted[0]
    assert max(np.abs(maps[c][0] - maps[c][i]).max() for i in (1, 2)) > 0.3, "same per image"
    assert all(p.grad is None for p in module.parameters())  # no gradients left behind


def test_channels_last_and_a_compiled_network_give_the_same_map(trained_run, inputs: Path):
    module = load_module(ckpt(trained_run, "classify"))
    gradcam = GradCam(module, 32)
    x = batch_of(inputs, module)[:2]
    plain = gradcam(x, [0, 2])
    assert all(m.std() > 0.1 for m in plain)
    module.channels_last = True
    module.follow_device(x.device)
    assert module.runs_channels_last
    np.testing.assert_allclose(gradcam(x, [0, 2]), plain, atol=1e-4)
    module.net = torch.compile(module.net)
    np.testing.assert_allclose(GradCam(module, 32)(x, [0, 2]), plain, atol=1e-4)


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_segmentation_checkpoint_is_refused_up_front(
    trained_run, inputs: Path, tmp_path: Path, command: str
):
    args = [f"ckpt_path={ckpt(trained_run, 'lung')}", "explain=gradcam"]
    if command == "predict":
        args += [f"input={inputs}", f"output={tmp_path / 'out'}"]
    cfg = compose_config(command, args, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        preflight(cfg, command, tmp_path / "run", [])
    message = str(err.value)
    assert "explain=gradcam" in message and "task=lung" in message
    assert "no class head" in message and "explain=none" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_bad_explain_value_is_refused(trained_run, inputs: Path, tmp_path: Path, command: str):
    args = [f"ckpt_path={ckpt(trained_run, 'classify')}", "explain=gradcm"]
    if command == "predict":
        args += [f"input={inputs}", f"output={tmp_path / 'out'}"]
    cfg = compose_config(command, args, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"explain='gradcm': must be none or gradcam"):
        preflight(cfg, command, tmp_path / "run", [])
    with pytest.raises(ConfigError, match="explain='gradcm' is not one of none, gradcam"):
        predict(ckpt(trained_run, "classify"), inputs, tmp_path / "out", explain="gradcm")
    assert not (tmp_path / "out").exists()


def test_an_ensemble_is_refused(trained_run, synth_root: Path, tmp_path: Path):
    both = f"[{ckpt(trained_run, 'classify')},{ckpt(trained_run, 'classify')}]"
    cfg = compose_config("eval", [f"ckpt_path={both}", "explain=gradcam"], tmp_path / "run")
    with pytest.raises(ConfigError, match="explain=gradcam explains one network"):
        preflight(cfg, "eval", tmp_path / "run", [])


def test_a_vision_transformer_is_explained_on_its_patch_grid():
    """model=vit: the maps are of the patch tokens entering the last block's attention, laid
    back on the 4 x 4 grid of 8 px patches and brought to the input's size; they differ by
    class and by image, as a convolutional network's do."""
    from torchmetrics import MetricCollection

    from covidqu.models.classification import ClassificationModule
    from covidqu.models.networks import build_classifier

    torch.manual_seed(0)
    vit = build_classifier("vit_tiny_patch16_224", weights=None, img_size=32, patch_size=8)
    module = ClassificationModule(net=vit.eval(), loss=None, metrics=MetricCollection([]))
    gradcam = GradCam(module, 32)
    assert gradcam.layer_name == f"blocks.{len(vit.blocks) - 1}.norm1"
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():  # as predict and eval run
        maps = [gradcam(x, [c] * 3) for c in range(len(CLASSES))]
    assert maps[0].shape == (3, 32, 32)
    assert all(m.std() > 0.1 for m in maps[0]), "a constant map"
    assert max(np.abs(maps[0] - maps[1]).max(axis=(1, 2))) > 0.3, "the same map for every class"
    assert np.abs(maps[0][0] - maps[0][1]).max() > 0.3, "the same map for every image"
    # each patch token goes to its own place on the grid; the class token to none
    _, _, to_maps = find_token_layer(vit, x)
    tokens = torch.arange(1 + 16, dtype=torch.float32)[None, :, None].expand(2, 17, 5)
    grid = to_maps(tokens)
    assert grid.shape == (2, 5, 4, 4)
    assert grid[0, 0].tolist() == [[1 + 4 * row + col for col in range(4)] for row in range(4)]
    # one patch sees nothing of where: refused, naming the input size
    small = build_classifier("vit_tiny_patch16_224", weights=None, img_size=16)
    with pytest.raises(ConfigError, match=r"sees its input \(16, 16\) as one patch"):
        GradCam(ClassificationModule(net=small, loss=None, metrics=MetricCollection([])), 16)


def test_a_token_network_other_than_a_vit_is_refused_by_name():
    from covidqu.models.networks import build_classifier

    mixer = build_classifier("mixer_s16_224", weights=None, img_size=32)  # tokens, no class token
    with pytest.raises(ConfigError, match="explain=gradcam explains a convolutional feature map"):
        find_target_layer(mixer.eval(), torch.zeros(1, 1, 32, 32))
