"""Batched augmentation on the device (augment=gpu_light|gpu_strong): image and masks move
together, masks keep their values, draws are per sample, reproducible, resumable, per rank,
and training batches alone are augmented."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_transforms import alignment, asymmetric_case

from covidqu.data.datamodule import InfectionDataModule, LungDataModule
from covidqu.data.datasets import DEFAULT_MEAN as MEAN
from covidqu.data.datasets import DEFAULT_STD as STD
from covidqu.data.device_augment import BatchAugment
from covidqu.errors import ConfigError, RunInterrupted
from covidqu.train.run import train

from pipeline_helpers import CONF, TINY, compose_config
from shared_folders import SharedFolders

#: strong.yaml's ranges, every transform off: a test turns on the ones it checks.
STRONG_RANGES = {
    "scale": [0.85, 1.15],
    "translate_percent": [-0.08, 0.08],
    "rotate": [-15, 15],
    "shear": [-5, 5],
    "elastic_alpha": 20,
    "elastic_sigma": 6,
    "brightness_limit": 0.25,
    "contrast_limit": 0.25,
    "gamma_limit": [80, 120],
    "blur_limit": [3, 5],
    "noise_std_range": [0.02, 0.06],
}


def device_config(name: str) -> BatchAugment:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"augment={name}"])
    assert list(cfg.augment.train) == []  # nothing left for the loader workers
    return instantiate(cfg.augment.device)


def case_batch(n: int = 16, size: int = 64, multiclass: bool = False, nested: bool = False) -> dict:
    """n copies of the asymmetric case as a collated infection batch: image, mask, lung.
    ``nested``: the lung mask also covers the infection, as in real data."""
    image, lung, inf = asymmetric_case(size)
    if nested:
        lung = np.maximum(lung, inf)
    x = (torch.from_numpy(image).float() / 255.0 - MEAN) / STD
    lung_t, inf_t = torch.from_numpy(lung).float(), torch.from_numpy(inf).float()
    if multiclass:  # the infection_multiclass target: class indices, infection over lung
        mask = (lung_t + 2 * inf_t).clamp(max=2).long().expand(n, size, size).clone()
    else:
        mask = inf_t.expand(n, 1, size, size).clone()
    return {
        "image": x.expand(n, 1, size, size).clone(),
        "mask": mask,
        "lung": lung_t.expand(n, 1, size, size).clone(),
        "label": torch.zeros(n, dtype=torch.long),
        "id": [f"case{i}" for i in range(n)],
    }


def gray(x: torch.Tensor) -> np.ndarray:
    """A model input back as the 8-bit image."""
    return ((x.numpy() * STD + MEAN) * 255.0).clip(0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", ["gpu_light", "gpu_strong"])
def test_image_and_masks_stay_aligned(name: str):
    """As tests/test_transforms.py checks the albumentations path: the image correlates with
    the picture its masks predict, and a flipped image clearly does not."""
    augment = device_config(name)
    batch = case_batch(16)
    moved = 0
    for step in range(4):
        out = augment(batch, key=(0, 0, step, 0), mean=MEAN, std=STD)
        for i in range(16):
            img, lm, im = gray(out["image"][i, 0]), out["lung"][i, 0], out["mask"][i, 0]
            assert set(lm.unique().tolist()) <= {0.0, 1.0}
            assert set(im.unique().tolist()) <= {0.0, 1.0}
            lm, im = lm.numpy().astype(np.uint8), im.numpy().astype(np.uint8)
            moved += int(not torch.equal(out["lung"][i], batch["lung"][i]))
            assert alignment(img, lm, im) > 0.8, (name, step, i)
            assert alignment(np.fliplr(img), lm, im) < 0.5, (name, step, i)
    assert moved >= 64 // 3  # it really moves things (affine p 0.7 / 0.8)


def random_blocks(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n gray images (n x 1 x size x size, [0, 1]) of black and white rectangles with sharp
    edges: a grid of 10 x 10 cells of random widths and heights, each cell black or white."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        rows, cols = (np.sort(rng.choice(np.arange(3, size - 2), 9, replace=False)) for _ in "yx")
        ys = np.searchsorted(rows, np.arange(size), side="right")
        xs = np.searchsorted(cols, np.arange(size), side="right")
        out[i, 0] = (rng.random((10, 10)) < 0.5)[ys[:, None], xs[None, :]]
    return torch.from_numpy(out)


@pytest.mark.parametrize("elastic", [False, True], ids=["affine", "affine_elastic"])
def test_masks_equal_the_thresholded_image_after_the_warp(elastic: bool):
    """Alignment to the pixel: where the image is black (0) or white (1) and its masks are the
    image thresholded at 0.5, the moved masks are the moved image thresholded at 0.5. Bilinear
    above 0.5 between a black and a white pixel is nearest-neighbour's choice; only near a
    block's corner do the two resamplings legitimately differ, at a few pixels of 4096 (9 at
    most here), whereas a mask grid shifted by half a pixel differs at hundreds."""
    size, n = 64, 16
    gray_level = random_blocks(n, size)
    batch = {
        "image": (gray_level - MEAN) / STD,
        "mask": gray_level.clone(),
        "lung": gray_level[:, 0].clone(),  # a 3-D mask takes the same grid
    }
    augment = BatchAugment(flip_p=0.5, affine_p=1.0, elastic_p=float(elastic), **STRONG_RANGES)
    for step in range(2):
        out = augment(batch, key=(0, 0, step, 0), mean=MEAN, std=STD)
        expected = (out["image"] * STD + MEAN > 0.5).float()
        for key in ("mask", "lung"):
            got = out[key].reshape(expected.shape)
            assert not torch.equal(got, gray_level)  # the masks did move
            differ = (got != expected).flatten(1).sum(1)
            assert int(differ.max()) <= 16, (key, step, differ.tolist())
            # and every pixel that differs lies on an edge of the moved mask
            edge = F.max_pool2d(got, 3, 1, 1) != -F.max_pool2d(-got, 3, 1, 1)
            assert not ((got != expected) & ~edge).any(), (key, step)


@pytest.mark.parametrize("multiclass", [False, True], ids=["binary", "multiclass"])
def test_masks_keep_their_values_and_move_on_one_grid(multiclass: bool):
    augment = BatchAugment(flip_p=0.5, affine_p=1.0, elastic_p=1.0, **STRONG_RANGES)
    batch = case_batch(16, multiclass=multiclass, nested=True)
    out = augment(batch, key=(1, 2, 3, 0), mean=MEAN, std=STD)
    assert out["mask"].dtype == batch["mask"].dtype and out["mask"].shape == batch["mask"].shape
    assert out["lung"].dtype == torch.float32 and out["lung"].shape == batch["lung"].shape
    assert set(out["lung"].unique().tolist()) == {0.0, 1.0}
    if multiclass:
        assert set(out["mask"].unique().tolist()) == {0, 1, 2}
        # class 1 or 2 exactly where the lung mask is: both masks took the same grid
        assert torch.equal(out["mask"] > 0, out["lung"][:, 0] > 0)
    else:
        assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
        # the infection still inside the lung: both masks took the same grid
        assert (out["mask"] * (1 - out["lung"])).sum() == 0
    assert not torch.equal(out["lung"], batch["lung"])
    assert out["id"] == batch["id"] and torch.equal(out["label"], batch["label"])


def test_nothing_changes_when_every_probability_is_zero():
    batch = case_batch(8, multiclass=True)
    for augment in (BatchAugment(**STRONG_RANGES), BatchAugment()):
        out = augment(batch, key=(0, 0, 0, 0), mean=MEAN, std=STD)
        for key in ("image", "mask", "lung"):
            assert torch.equal(out[key], batch[key]), key


@pytest.mark.parametrize(
    ("switch", "masks"),
    [
        ({"flip_p": 1.0}, "every"),
        ({"affine_p": 1.0}, "every"),
        ({"elastic_p": 1.0, "elastic_alpha": 300}, "some"),  # strong's alpha moves < 1 px...
        ({"elastic_p": 1.0}, None),  # ... which still resamples the image
        ({"brightness_contrast_p": 1.0}, "none"),
        ({"gamma_p": 1.0}, "none"),
        ({"blur_noise_p": 1.0, "noise_std_range": [0, 0]}, "none"),  # only blur has an effect
        ({"blur_noise_p": 1.0, "blur_sigma": [1e-3, 1e-3]}, "none"),  # only noise has one
    ],
)
def test_each_transform_changes_the_batch_when_forced(switch: dict, masks: str | None):
    augment = BatchAugment(**{**STRONG_RANGES, **switch})
    batch = case_batch(16)
    out = augment(batch, key=(0, 0, 0, 0), mean=MEAN, std=STD)
    changed = (out["image"] - batch["image"]).abs().amax(dim=(1, 2, 3)) > 1e-3
    if "blur_noise_p" in switch:  # one of the two, evenly: about half the samples each
        assert 2 <= int(changed.sum()) <= 14
    else:
        assert changed.all()
    moved = (out["lung"] != batch["lung"]).flatten(1).any(dim=1)
    moved |= (out["mask"] != batch["mask"]).flatten(1).any(dim=1)
    if masks == "every":
        assert moved.all()
    elif masks == "some":
        assert moved.any()
    elif masks == "none":  # intensity alone: masks untouched
        assert not moved.any()


def test_a_flip_is_exact_and_samples_left_alone_stay_exact():
    """Half the batch flipped, half not, in one resampling: each exactly as it should be."""
    batch = case_batch(16, multiclass=True)
    out = BatchAugment(flip_p=0.5)(batch, key=(0, 0, 0, 0), mean=MEAN, std=STD)
    flipped = [not torch.equal(out["mask"][i], batch["mask"][i]) for i in range(16)]
    assert 2 <= sum(flipped) <= 14
    for i, f in enumerate(flipped):
        for key in ("mask", "lung"):
            want = batch[key][i].flip(-1) if f else batch[key][i]
            assert torch.equal(out[key][i], want), (key, i)
        want = batch["image"][i].flip(-1) if f else batch["image"][i]
        assert (
            torch.allclose(out["image"][i], want, atol=1e-5)
            if f
            else torch.equal(out["image"][i], want)
        )


def test_outside_the_image_is_black_and_background():
    """Zeros outside on the [0, 1] gray level: a black border, normalised like any pixel."""
    augment = BatchAugment(affine_p=1.0, scale=[0.5, 0.5])
    batch = case_batch(4)
    batch["image"] = torch.full_like(batch["image"], (1.0 - MEAN) / STD)  # all white
    batch["lung"] = torch.ones_like(batch["lung"])
    out = augment(batch, key=(0, 0, 0, 0), mean=MEAN, std=STD)
    corner = out["image"][:, 0, :4, :4]
    assert torch.allclose(corner, torch.full_like(corner, (0.0 - MEAN) / STD), atol=1e-5)
    assert out["lung"][:, 0, :4, :4].sum() == 0
    centre = out["image"][:, 0, 28:36, 28:36]
    assert torch.allclose(centre, torch.full_like(centre, (1.0 - MEAN) / STD), atol=1e-5)


def test_samples_of_a_batch_draw_their_own_parameters():
    batch = case_batch(16)
    for augment in (
        BatchAugment(affine_p=1.0, **STRONG_RANGES),
        BatchAugment(brightness_contrast_p=1.0, **STRONG_RANGES),
    ):
        out = augment(batch, key=(0, 0, 0, 0), mean=MEAN, std=STD)["image"].flatten(1)
        distinct = {tuple(row.tolist()) for row in out.round(decimals=4)}
        assert len(distinct) == 16, augment


def test_draws_follow_the_key_and_leave_the_global_rng_alone():
    augment = device_config("gpu_strong")
    batch = case_batch(16, multiclass=True)

    def run(*key: int) -> dict:
        return augment(batch, key=key, mean=MEAN, std=STD)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = run(42, 1, 5, 0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global seed plays no part
    again = run(42, 1, 5, 0)
    for key in ("image", "mask", "lung"):
        assert torch.equal(first[key], again[key]), key
    for other in ((42, 1, 5, 1), (42, 1, 6, 0), (42, 2, 5, 0), (43, 1, 5, 0)):  # rank, batch,
        assert not torch.equal(first["image"], run(*other)["image"]), other  # epoch, seed


def test_both_a_loader_and_a_device_augmentation_are_refused(synth_root: Path):
    with pytest.raises(ConfigError, match=r"augment\.train and augment\.device"):
        LungDataModule(root=synth_root, augment=[A.HorizontalFlip()], device_augment=BatchAugment())
    # a stale augment.train beside augment=gpu_light, as a config would compose it
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "augment=gpu_light",
                f"data.root={synth_root}",
                "augment.train=[{_target_: albumentations.HorizontalFlip}]",
            ],
        )
    with pytest.raises(Exception) as caught:
        instantiate(cfg.data)
    assert isinstance(caught.value.__cause__ or caught.value, ConfigError)


@pytest.mark.parametrize(
    ("bad", "key"),
    [({"affine_p": 1.5}, "affine_p"), ({"rotate": [10, -10]}, "rotate")],
)
def test_bad_parameters_name_their_key(bad: dict, key: str):
    with pytest.raises(ConfigError, match=rf"augment\.device\.{key}"):
        BatchAugment(**bad)


def test_the_datamodule_keys_draws_by_epoch_batch_and_rank(synth_root: Path):
    """The hook Lightning calls after transfer: training batches only, drawn by the fit
    loop's position and the process's rank (a stand-in trainer says where the loop is)."""
    dm = InfectionDataModule(
        root=synth_root, image_size=32, batch_size=4, num_workers=0, seed=7,
        device_augment=device_config("gpu_strong"),
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))

    def hook(epoch: int = 0, index: int = 0, rank: int = 0, training: bool = True) -> dict:
        progress = SimpleNamespace(current=SimpleNamespace(ready=index))
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            training=training,
            current_epoch=epoch,
            global_rank=rank,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        )
        return dm.on_after_batch_transfer(batch, 0)

    assert hook(training=False) is batch  # validation, test, predict, sanity checks
    first = hook()["image"]
    assert not torch.equal(first, batch["image"])
    assert torch.equal(first, hook()["image"])
    for other in ({"rank": 1}, {"index": 1}, {"epoch": 1}):
        assert not torch.equal(first, hook(**other)["image"]), other
    dm.trainer = None
    assert dm.on_after_batch_transfer(None, 0) is None  # a batch whose files were all skipped


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class Recorder(pl.Callback):
    """Appends, for every batch a training or validation step gets, its epoch, index and a
    digest of its image, mask and lung mask to ``out`` (one line each, as they come)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _write(self, stage: str, trainer: pl.Trainer, batch: dict, batch_idx: int) -> None:
        sums = [_digest(batch[k]) for k in ("image", "mask", "lung") if k in batch]
        fields = [stage, str(trainer.current_epoch), str(batch_idx), ",".join(batch["id"])]
        with self.out.open("a") as fh:
            fh.write("\t".join([*fields, *sums]) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write("train", trainer, batch, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0) -> None:
        self._write("val", trainer, batch, batch_idx)


RUN = [
    *TINY,
    "task=infection",
    "augment=gpu_strong",
    "data.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "model.encoder_depth=3",
    "model.decoder_channels=[32,16,8]",
]


def run_overrides(root: Path, record: Path, *extra: str) -> list[str]:
    return [
        *RUN,
        f"data.root={root}",
        "+callbacks.record._target_=test_device_augment.Recorder",
        f"+callbacks.record.out={record}",
        *extra,
    ]


def lines(record: Path, stage: str) -> list[list[str]]:
    return [ln.split("\t") for ln in record.read_text().splitlines() if ln.startswith(stage)]


@pytest.fixture(scope="module")
def reference(synth_root: Path, shared_folders: SharedFolders) -> Path:
    """What every batch of an uninterrupted two-epoch run looked like to its steps (built once
    per session, read-only)."""

    def build(out: Path) -> None:
        train(compose_config("train", run_overrides(synth_root, out / "batches.txt"), out / "run"))

    return shared_folders.get("device-augment-reference", build) / "batches.txt"


def test_a_training_run_augments_training_batches_only(synth_root: Path, reference: Path):
    """Through the real config: the steps see augmented training batches (unlike the loader's
    own), and validation batches exactly as the loader gives them."""
    dm = InfectionDataModule(root=synth_root, image_size=32, batch_size=2, num_workers=0, seed=42)
    dm.setup("fit")
    raw_val = [[_digest(b[k]) for k in ("image", "mask", "lung")] for b in dm.val_dataloader()]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)  # as Lightning does
    raw_train = {",".join(b["id"]): b for b in loader}

    train_lines = lines(reference, "train")
    assert [(int(e), int(b)) for _, e, b, *_ in train_lines] == [
        (e, b) for e in range(2) for b in range(3)
    ]
    for _, epoch, _, ids, *sums in train_lines:
        if epoch == "0":
            batch = raw_train[ids]  # the same images, moved or changed
            assert sums[0] != _digest(batch["image"]), ids
    val_lines = lines(reference, "val")
    assert val_lines  # per epoch, and the best checkpoint's validation at the end
    for _, _, index, _, *sums in val_lines:
        assert sums == raw_val[int(index)]


def test_a_fast_dev_run_with_gpu_light(synth_root: Path, tmp_path: Path):
    """augment=gpu_light as a user types it, on the lung task: the step gets the loader's
    images augmented (its only batch has affine p 0.7 per sample), validation the loader's."""
    record = tmp_path / "batches.txt"
    overrides = [
        *TINY,
        f"data.root={synth_root}",
        "augment=gpu_light",
        "debug=fdr",
        "+callbacks.record._target_=test_device_augment.Recorder",
        f"+callbacks.record.out={record}",
    ]
    train(compose_config("train", overrides, tmp_path / "run"))
    dm = LungDataModule(root=synth_root, image_size=32, batch_size=4, num_workers=0, seed=42)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    raw = next(iter(loader))
    ((_, _, _, ids, image, mask),) = lines(record, "train")
    assert ids == ",".join(raw["id"])
    assert image != _digest(raw["image"]) and mask != _digest(raw["mask"])
    raw = next(iter(dm.val_dataloader()))
    val = lines(record, "val")
    assert len(val) == 2  # the fit's validation and the final one
    for _, _, _, ids, image, mask in val:
        assert [ids, image, mask] == [
            ",".join(raw["id"]),
            _digest(raw["image"]),
            _digest(raw["mask"]),
        ]


def test_a_run_resumed_mid_epoch_sees_the_same_augmented_batches(
    synth_root: Path, reference: Path, tmp_path: Path
):
    record = tmp_path / "batches.txt"
    stop = [
        "+callbacks.stop_at._target_=signal_helpers.SignalAt",
        "+callbacks.stop_at.epoch=1",
        "+callbacks.stop_at.batch=0",
        "+callbacks.stop_at.send=SIGINT",
    ]
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train(compose_config("train", run_overrides(synth_root, record, *stop), run))
    assert len(lines(record, "train")) == 4  # epoch 0, and batch 0 of epoch 1
    train(compose_config("train", run_overrides(synth_root, record, *stop), run))  # resumes
    assert lines(record, "train") == lines(reference, "train")
