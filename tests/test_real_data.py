"""The real COVID-QU-Ex data beside the project: the sample tree and the infection Train/Val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covidqu.data.datamodule import InfectionDataModule, LungDataModule
from covidqu.data.layout import scan
from covidqu.data.readers import decode_png, read_image, read_mask


def test_sample_counts_and_pairing(sample_root: Path):
    index = scan(sample_root)
    assert index.problems == []
    expected = {"train": 3, "val": 2, "test": 2}
    assert index.counts() == {k: expected[k.split("/")[1]] for k in index.counts()}
    assert len(index.counts()) == 18
    for s in index:
        assert s.lung_mask.name == s.image.name
        if s.subset == "infection":
            assert s.infection_mask.name == s.image.name
    # some real Non-COVID files are named Non_COVID (n).png: the folder decides
    odd = [s for s in index if s.image.name.startswith("Non_COVID")]
    assert odd and {s.cls for s in odd} == {"Non-COVID"}


def test_same_file_name_is_the_same_image_in_both_subsets(sample_root: Path):
    index = scan(sample_root)
    lung = {s.image.name: s for s in index.select("lung")}
    shared = [s for s in index.select("infection") if s.image.name in lung]
    assert shared
    for s in shared[:5]:
        assert np.array_equal(read_image(s.image), read_image(lung[s.image.name].image))


def test_masks_binarise(sample_root: Path):
    for s in scan(sample_root).select("infection"):
        assert set(np.unique(decode_png(s.lung_mask))) == {0, 255}  # as stored
        lung = read_mask(s.lung_mask)
        assert lung.dtype == np.uint8 and set(np.unique(lung)) == {0, 1}
        assert 0.03 < lung.mean() < 0.7  # lungs cover a plausible share of a CXR
        inf = read_mask(s.infection_mask)
        if s.cls == "COVID-19":
            assert inf.any()
        else:
            assert not inf.any()


@pytest.mark.parametrize("cls", [LungDataModule, InfectionDataModule])
def test_a_batch_from_each_datamodule(sample_root: Path, cls):
    dm = cls(root=sample_root, image_size=64, batch_size=6, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 1, 64, 64)
    assert batch["mask"].shape == (6, 1, 64, 64)
    assert torch.isfinite(batch["image"]).all()
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["label"].min() >= 0 and batch["label"].max() <= 2


def test_real_infection_splits_index(real_root: Path):
    index = scan(real_root)
    assert index.problems == []
    counts = index.counts()
    assert counts["infection/train/COVID-19"] == 1864
    assert counts["infection/val/Normal"] == 233
    assert len(index) == 4660
    dm = InfectionDataModule(root=real_root, image_size=64, num_workers=0, limit_per_class=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6
    item = dm.datasets["train"][0]
    assert item["mask"].sum() > 0  # first is COVID-19 and carries infection
