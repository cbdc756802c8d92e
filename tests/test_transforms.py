"""Augmentation moves images and masks together, and differs between workers and epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from covidqu.data.datasets import CXRDataset
from covidqu.data.layout import Sample
from covidqu.data.transforms import build_transform

from conftest import PROJECT_ROOT


def augment_config(name: str) -> list:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"augment={name}"])
    return list(instantiate(cfg.augment.train))


def asymmetric_case(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image whose bright shapes are exactly two masks; shapes differ so flips would show."""
    lung = np.zeros((size, size), np.uint8)
    lung[8:40, 6:22] = 1  # tall block, left
    inf = np.zeros((size, size), np.uint8)
    inf[44:54, 30:58] = 1  # wide block, bottom right
    image = np.full((size, size), 40, np.uint8)
    image[lung > 0] = 200
    image[inf > 0] = 250
    return image, lung, inf


def alignment(img: np.ndarray, lung: np.ndarray, inf: np.ndarray) -> float:
    """Correlation of an image with the picture its masks predict (1 = perfectly aligned)."""
    predicted = 40.0 + 160.0 * lung + 210.0 * inf
    return float(np.corrcoef(img.astype(float).ravel(), predicted.ravel())[0, 1])


@pytest.mark.parametrize("name", ["light", "strong"])
def test_image_and_masks_stay_aligned(name: str):
    image, lung, inf = asymmetric_case()
    transform = build_transform(64, augment_config(name), seed=3)
    moved = 0
    for _ in range(40):
        out = transform(image=image, masks=[lung, inf])
        img, (lm, im) = out["image"], out["masks"]
        assert set(np.unique(lm)) <= {0, 1} and set(np.unique(im)) <= {0, 1}  # nearest-neighbour
        moved += int(not np.array_equal(lm, lung))
        assert alignment(img, lm, im) > 0.8, name
        # the same masks against an image moved differently are clearly worse
        assert alignment(np.fliplr(img), lm, im) < 0.5
    assert moved >= 10  # the pipeline really moves things


def _pattern_tree(root: Path, subset: str, size: int) -> np.ndarray:
    """Overwrite the Train split of a synthetic tree: every image is its lung mask drawn white.

    The lung mask is an asymmetric shape (so no flip, shift or rotation maps it onto itself);
    the infection mask of a COVID-19 image is part of it, those of other classes are empty.
    Returns the lung mask as stored (0 / 1).
    """
    import cv2

    from covidqu.data.layout import INFECTION_MASKS_DIR, LUNG_MASKS_DIR, SUBSET_DIRS

    lung = np.zeros((size, size), np.uint8)
    lung[6:40, 8:16] = 1  # tall bar, left
    lung[30:37, 16:42] = 1  # foot, bottom right
    lung[6:12, 32:38] = 1  # small block, top right
    infection = np.zeros_like(lung)
    infection[30:37, 24:42] = 1
    train = root / SUBSET_DIRS[subset] / SUBSET_DIRS[subset] / "Train"
    for image in sorted(train.glob("*/images/*.png")):
        cls_dir = image.parent.parent
        assert cv2.imwrite(str(image), lung * 255)
        assert cv2.imwrite(str(cls_dir / LUNG_MASKS_DIR / image.name), lung * 255)
        if subset == "infection":
            inf = infection if cls_dir.name == "COVID-19" else np.zeros_like(infection)
            assert cv2.imwrite(str(cls_dir / INFECTION_MASKS_DIR / image.name), inf * 255)
    return lung


def _iou_of_image_and_mask(x: torch.Tensor, mask: torch.Tensor, mean: float, std: float) -> float:
    """IoU of a model input's bright part (Otsu threshold on the de-normalised image) and a mask.

    Intensity augmentations (brightness, contrast, gamma, CLAHE, noise, blur) keep the shape
    bright on a dark ground; linear interpolation of the image against nearest-neighbour masks
    only blurs the edges: an image moved with its masks scores about 0.9 (0.85 at worst seen).
    """
    import cv2

    img = ((x[0].numpy() * std + mean) * 255.0).clip(0, 255).round().astype(np.uint8)
    thr, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = img > thr
    truth = mask.reshape(img.shape).numpy() > 0
    return float((bright & truth).sum() / max((bright | truth).sum(), 1))


@pytest.mark.parametrize(
    ("subset", "name"), [("lung", "light"), ("lung", "strong"), ("infection", "strong")]
)
def test_dataset_and_datamodule_items_keep_image_and_masks_aligned(
    synth_copy: Path, subset: str, name: str
):
    """The real augmentation configs, drawn through the DataModule as training draws them.

    An image moved by one draw and its masks by another (two calls of the pipeline) are off by
    a shift, rotation or flip, which drops the IoU of the image's bright part with the mask.
    """
    from conftest import SYNTH_SIZE

    size = 64
    lung = _pattern_tree(synth_copy, subset, SYNTH_SIZE)
    overrides = [
        f"task={subset}",
        f"augment={name}",
        f"data.root={synth_copy}",
        f"data.image_size={size}",
        "data.batch_size=4",
        "data.num_workers=0",
    ]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)  # the dataset seeds its augmentation from torch's seed
    dm = instantiate(cfg.data)
    assert len(dm.augment) == len(cfg.augment.train) > 0
    dm.setup("fit")
    still = torch.from_numpy(build_transform(size)(image=lung, masks=[lung])["masks"][0])

    items = [dm.datasets["train"][i] for _ in range(4) for i in range(len(dm.datasets["train"]))]
    for _ in range(3):  # epochs of the training loader: shuffled, batched, collated
        for batch in dm.train_dataloader():
            items += [{k: v[j] for k, v in batch.items()} for j in range(len(batch["id"]))]
    assert len(items) >= 50

    moved = 0
    for item in items:
        lung_mask = item["lung"] if subset == "infection" else item["mask"]
        assert lung_mask.shape == (1, size, size)
        moved += int(not torch.equal(lung_mask[0].long(), still.long()))
        iou = _iou_of_image_and_mask(item["image"], lung_mask, dm.mean, dm.std)
        assert iou > 0.8, (item["id"], name, iou)
        if subset == "infection":  # the two masks moved together too
            assert (item["mask"] * (1 - item["lung"])).sum() == 0
    assert moved >= len(items) // 3  # the pipeline really moves things


def test_resize_keeps_masks_binary_and_aligned():
    image, lung, inf = asymmetric_case(64)
    out = build_transform([32, 48])(image=image, masks=[lung, inf])
    assert out["image"].shape == out["masks"][0].shape == (32, 48)
    assert alignment(out["image"], *out["masks"]) > 0.95


def test_workers_draw_different_augmentations(tmp_path: Path):
    """Forked workers copy the pipeline's generator: without reseeding they would repeat it."""
    import cv2

    image, lung, _ = asymmetric_case()
    cv2.imwrite(str(tmp_path / "img.png"), image)
    cv2.imwrite(str(tmp_path / "lung.png"), lung * 255)
    sample = Sample("lung", "train", "Normal", "img", tmp_path / "img.png", tmp_path / "lung.png")
    ds = CXRDataset([sample] * 8, transform=build_transform(64, augment_config("strong")))

    def epoch(loader):
        return torch.cat([b["mask"] for b in loader])

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    first, second = epoch(loader), epoch(loader)
    # worker 0 made items 0-3, worker 1 items 4-7: their augmentations must differ
    assert not torch.equal(first[:4], first[4:])
    # and non-persistent workers must not replay last epoch
    assert not torch.equal(first, second)
    # while the whole thing stays reproducible under the same seed
    torch.manual_seed(0)
    assert torch.equal(first, epoch(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))


def test_ddp_ranks_without_workers_draw_different_augmentations(tmp_path: Path, monkeypatch):
    """With data.num_workers=0 every rank's main process has the same torch seed after
    seed_everything: the rank must still give each process its own augmentations."""
    import cv2
    import pytorch_lightning as pl

    image, lung, _ = asymmetric_case()
    cv2.imwrite(str(tmp_path / "img.png"), image)
    cv2.imwrite(str(tmp_path / "lung.png"), lung * 255)
    sample = Sample("lung", "train", "Normal", "img", tmp_path / "img.png", tmp_path / "lung.png")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    def masks_drawn(rank: int) -> torch.Tensor:
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        pl.seed_everything(7, workers=True, verbose=False)
        ds = CXRDataset([sample] * 8, transform=build_transform(64, augment_config("strong")))
        return torch.stack([ds[i]["mask"] for i in range(len(ds))])

    rank0, rank1 = masks_drawn(0), masks_drawn(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank1, masks_drawn(1))  # the same rank and seed draw the same
    assert torch.equal(rank0, masks_drawn(0))
