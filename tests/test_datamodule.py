"""Datasets and DataModules: the batch contract, options, config composition, bad data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from covidqu.data.datamodule import InfectionDataModule, LungDataModule
from covidqu.data.datasets import DEFAULT_MEAN, DEFAULT_STD, CXRDataset
from covidqu.data.layout import SUBSET_DIRS, DataError
from covidqu.data.loading import EpochSampler
from covidqu.data.readers import ImageDecodeError

from conftest import PROJECT_ROOT, SYNTH_PER_CLASS, SYNTH_SIZE

SIZE = 32


def full_batch(dm, split: str = "train") -> dict:
    """The whole split in one batch, in index order."""
    dm.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    ds = dm.datasets[split]
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    return next(iter(loader))


def make(cls, root, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 4)
    return cls(root=root, **kw)


def check_common(batch: dict, n: int) -> None:
    x = batch["image"]
    assert x.shape == (n, 1, SIZE, SIZE) and x.dtype == torch.float32
    lo, hi = (0 - DEFAULT_MEAN) / DEFAULT_STD, (1 - DEFAULT_MEAN) / DEFAULT_STD
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    assert x.std() > 0.1  # a real image, not a constant
    assert batch["label"].dtype == torch.int64
    assert sorted(Counter(batch["label"].tolist()).items()) == [
        (c, SYNTH_PER_CLASS) for c in range(3)
    ]
    assert len(batch["id"]) == n and all(isinstance(i, str) for i in batch["id"])


def test_lung_batch(synth_root: Path):
    dm = make(LungDataModule, synth_root)
    batch = full_batch(dm)
    check_common(batch, 9)
    m = batch["mask"]
    assert m.shape == (9, 1, SIZE, SIZE) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert "lung" not in batch
    # lungs are darker than the rest of the body in a CXR: the mask marks the image's lungs
    assert batch["image"][m.bool()].mean() < batch["image"][~m.bool()].mean()


def test_infection_binary_batch(synth_root: Path):
    dm = make(InfectionDataModule, synth_root)
    batch = full_batch(dm)
    check_common(batch, 9)
    m, lung, y = batch["mask"], batch["lung"], batch["label"]
    assert m.shape == lung.shape == (9, 1, SIZE, SIZE)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m[y == 0].flatten(1).sum(1) > 0).all()  # every COVID-19 image has infection
    assert m[y != 0].sum() == 0  # Non-COVID and Normal have none
    assert (m * (1 - lung)).sum() <= 0.02 * m.sum()  # infection lies in the lung


def test_infection_multiclass_batch(synth_root: Path):
    dm = make(InfectionDataModule, synth_root, target="infection_multiclass")
    batch = full_batch(dm, "val")
    check_common(batch, 9)
    m, lung, y = batch["mask"], batch["lung"], batch["label"]
    assert m.shape == (9, SIZE, SIZE) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 1, 2}
    assert torch.equal(m > 0, lung[:, 0].bool() | (m == 2))
    assert (m[y != 0] == 2).sum() == 0


def test_lung_target_on_the_infection_subset(synth_root: Path):
    batch = full_batch(make(InfectionDataModule, synth_root, target="lung"), "test")
    assert batch["mask"].shape == (9, 1, SIZE, SIZE) and "lung" not in batch


def test_every_split_resized_and_augmented_only_in_train(synth_root: Path):
    import albumentations as A

    flip = [A.HorizontalFlip(p=1.0)]
    dm = make(LungDataModule, synth_root, image_size=[24, 40], augment=flip)
    for split in ("train", "val", "test"):
        assert full_batch(dm, split)["image"].shape[-2:] == (24, 40)
    plain = make(LungDataModule, synth_root, image_size=[24, 40])
    t, p = full_batch(dm, "train")["image"], full_batch(plain, "train")["image"]
    assert torch.allclose(t, p.flip(-1))
    assert torch.equal(full_batch(dm, "val")["image"], full_batch(plain, "val")["image"])


def test_loaders_with_workers_batch_sizes_and_sampler(synth_root: Path):
    dm = make(
        LungDataModule,
        synth_root,
        num_workers=2,
        batch_size=4,
        eval_batch_size=5,
        balanced_sampler=True,
        persistent_workers=False,
        drop_last=False,
    )
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, EpochSampler) and train.sampler.weights is not None
    assert [len(b["id"]) for b in train] == [4, 4, 1]
    assert [len(b["id"]) for b in val] == [5, 4]
    dm.drop_last = True
    assert [len(b["id"]) for b in dm.train_dataloader()] == [4, 4]
    dm.batch_size = 16  # a split smaller than one batch still gives a batch
    assert [len(b["id"]) for b in dm.train_dataloader()] == [9]
    assert dm.test_dataloader().dataset is dm.datasets["test"]


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    """Make this process look like process ``rank`` of ``world`` DDP processes."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


def test_ddp_evaluation_shards_hold_every_image_once(synth_root: Path, monkeypatch):
    """Lightning's unrepeated sampler, interleaved as the per-image rows' gathering expects."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    dm = make(LungDataModule, synth_root, eval_batch_size=2)
    dm.setup("test")
    ids = [s.id for s in dm.datasets["test"].samples]
    shards = []
    for rank in range(2):
        as_rank(monkeypatch, rank, world=2)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        shards.append([i for batch in loader for i in batch["id"]])
    assert shards == [ids[0::2], ids[1::2]]  # 5 + 4 images: none padded, none dropped
    # a split smaller than the number of processes is refused, saying what to change
    as_rank(monkeypatch, 9, world=10)
    with pytest.raises(DataError, match=r"test split has 9 images.*10 processes.*trainer\.devices"):
        dm.test_dataloader()


def test_balanced_sampler_draws_classes_evenly(synth_copy: Path):
    # Make COVID-19 five times as common as each other class in train (15 : 3 : 3).
    folder = synth_copy / SUBSET_DIRS["lung"] / SUBSET_DIRS["lung"] / "Train" / "COVID-19"
    for k in range(12):
        for sub in ("images", "lung masks"):
            src = sorted((folder / sub).iterdir())[0]
            shutil.copy(src, folder / sub / f"covid_{9000 + k}.png")
    dm = make(LungDataModule, synth_copy, balanced_sampler=True, seed=1)
    dm.setup("fit")
    labels = dm.datasets["train"].labels
    assert Counter(labels)[0] == 15
    sampler = dm.train_dataloader().sampler
    drawn = Counter()
    for epoch in range(200):  # a new draw each epoch, as Lightning sets it
        sampler.set_epoch(epoch)
        drawn.update(labels[i] for i in sampler)
    share = drawn[0] / sum(drawn.values())
    assert 0.28 < share < 0.39  # about 1/3, where uniform drawing would give 15/21 = 0.71


def test_limit_per_class(synth_root: Path):
    dm = make(LungDataModule, synth_root, limit_per_class={"train": 2, "val": 1})
    dm.setup("fit")
    dm.setup("test")
    assert Counter(dm.datasets["train"].labels) == {0: 2, 1: 2, 2: 2}
    assert Counter(dm.datasets["val"].labels) == {0: 1, 1: 1, 2: 1}
    assert len(dm.datasets["test"]) == 9
    again = make(LungDataModule, synth_root, limit_per_class={"train": 2, "val": 1})
    assert [s.id for s in again.split_samples("train")] == [
        s.id for s in dm.datasets["train"].samples
    ]
    with pytest.raises(ValueError, match="unknown split"):
        make(LungDataModule, synth_root, limit_per_class={"training": 2})


def test_root_from_environment(synth_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COVIDQU_ROOT", str(synth_root))
    dm = LungDataModule(image_size=SIZE, num_workers=0)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 9


def test_no_root_says_how_to_configure():
    dm = LungDataModule(num_workers=0)
    with pytest.raises(DataError, match=r"data\.root=.*COVIDQU_ROOT"):
        dm.prepare_data()


def test_empty_split_is_refused_naming_the_folder(synth_copy: Path):
    test_dir = synth_copy / SUBSET_DIRS["lung"] / SUBSET_DIRS["lung"] / "Test"
    shutil.rmtree(test_dir)
    dm = make(LungDataModule, synth_copy)
    dm.prepare_data()  # the tree is fine: training can go on
    dm.setup("fit")
    with pytest.raises(DataError, match=r"test split of the lung subset is empty.*Test"):
        dm.setup("test")


def test_orphans_are_refused_before_training(synth_copy: Path):
    folder = synth_copy / SUBSET_DIRS["infection"] / SUBSET_DIRS["infection"] / "Val" / "Normal"
    victim = sorted((folder / "infection masks").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"has no mask in 'infection masks'"):
        make(InfectionDataModule, synth_copy).prepare_data()
    # the lung subset is untouched and still loads
    make(LungDataModule, synth_copy).prepare_data()


def test_corrupt_png_at_load_time_names_it(synth_copy: Path):
    dm = make(LungDataModule, synth_copy)
    dm.setup("fit")
    sample = dm.datasets["val"].samples[4]
    sample.image.write_bytes(sample.image.read_bytes()[:60])
    name = sample.image.name.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ImageDecodeError, match=name):
        CXRDataset([sample])[0]
    # the DataModule's loaders raise in the main process, even where a worker decoded it
    with pytest.raises(DataError, match=name):
        list(dm.val_dataloader())


def test_size_mismatch_at_load_time_names_both_files(synth_copy: Path):
    import cv2
    import numpy as np

    dm = make(LungDataModule, synth_copy)
    dm.setup("fit")
    sample = dm.datasets["train"].samples[0]
    cv2.imwrite(str(sample.lung_mask), np.zeros((SYNTH_SIZE // 2, SYNTH_SIZE), np.uint8))
    with pytest.raises(DataError, match="must have the same size") as err:
        list(dm.train_dataloader())
    assert str(sample.lung_mask) in str(err.value) and str(sample.image) in str(err.value)


def test_bad_options_are_refused(synth_root: Path):
    with pytest.raises(ValueError, match=r"data\.target='infection' is not served by the lung"):
        make(LungDataModule, synth_root, target="infection")
    with pytest.raises(ValueError, match=r"data\.image_size"):
        make(LungDataModule, synth_root, image_size=2)
    with pytest.raises(ValueError, match=r"data\.reader"):
        make(LungDataModule, synth_root, reader="lmdb")
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        make(LungDataModule, synth_root, batch_size=0)


@pytest.mark.parametrize("data", ["lung", "infection"])
@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_hydra_config_builds_the_datamodule(synth_root: Path, data: str, augment: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"task={data}",  # each segmentation task picks its subset
                f"augment={augment}",
                f"data.root={synth_root}",
                "data.num_workers=0",
                f"data.image_size={SIZE}",
            ],
        )
    dm = instantiate(cfg.data)
    assert type(dm) is {"lung": LungDataModule, "infection": InfectionDataModule}[data]
    assert dm.target == data
    assert len(dm.augment) == len(cfg.augment.train)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (min(cfg.data.batch_size, 9), 1, SIZE, SIZE)
    assert torch.isfinite(batch["image"]).all()


def test_config_defaults_to_the_environment_root(synth_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COVIDQU_ROOT", str(synth_root))
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=classify", "data=infection"])
    assert cfg.data.root == str(synth_root)
    assert cfg.data._target_.endswith("InfectionDataModule")  # the command line beats the task


@pytest.mark.parametrize(
    ("cls", "target"),
    [
        (LungDataModule, "lung"),
        (InfectionDataModule, "infection"),
        (InfectionDataModule, "infection_multiclass"),
    ],
)
def test_normalise_on_the_device_gives_the_same_batches(synth_root: Path, cls, target):
    """data.normalise=device: the loaders give uint8 tensors (a quarter of the bytes), and the
    DataModule's transfer hook makes exactly the float batch normalise=loader gives."""
    on_loader = full_batch(make(cls, synth_root, target=target))
    dm = make(cls, synth_root, target=target, normalise="device")
    raw = full_batch(dm)
    assert {raw[k].dtype for k in ("image", "mask", *(["lung"] if "lung" in raw else []))} == {
        torch.uint8
    }
    assert raw["image"].nbytes * 4 == on_loader["image"].nbytes
    finished = dm.on_after_batch_transfer(raw, 0)
    assert finished.keys() == on_loader.keys()
    for key, want in on_loader.items():
        got = finished[key]
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), key
        else:
            assert got == want, key


def test_normalise_must_be_loader_or_device(synth_root: Path):
    from covidqu.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.normalise='gpu'.*loader\|device"):
        make(LungDataModule, synth_root, normalise="gpu")
