"""Data-layer benchmarks, measured side by side in one run.

1. Scanning: the index of a tree with the full official counts of both subsets (33,920 + 5,826
   images, 85,318 files) against a bare ``os.walk`` over the same tree.
2. Loading: samples per second through :class:`~covidqu.data.datamodule.LungDataModule`'s
   DataLoader against a hand-written Dataset that does the least a training loop needs (decode,
   resize, normalise), with the same workers and batch size. The ratio is the framework's
   overhead; it should stay close to 1.
3. The packed cache: samples per second through the same DataModule with its defaults, reading
   PNG files against reading the packed arrays (``data.cache=packed``; ``data.normalise=auto``
   then sends uint8 batches, made float here on the CPU as the training device would), with
   augment ``none`` and ``light`` (aim: >= 5x with ``none``); the packed arrays with float
   batches made in the workers (``data.normalise=loader``); and a hand-written Dataset over the
   same packed arrays that only indexes them, normalises and returns the same float tensors.

    python experiments/bench_data.py [--root ROOT] [--workers 2] [--size 256] [--batches 40]
        [--skip-scan] [--cache-dir DIR]

Without ``--root`` it writes a synthetic tree (tiny images for the scan, 256 px for loading)
under a temporary folder. The subset loaded is the lung subset where the tree has it, else the
infection subset. Packing (once, timed) goes into ``--cache-dir`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidqu.data.datamodule import InfectionDataModule, LungDataModule
from covidqu.data.layout import MASK_DIRS, OFFICIAL_COUNTS, SPLIT_DIRS, SUBSET_DIRS, scan
from covidqu.data.synth import generate

PATTERNS = {
    "COVID-19": "covid_{}.png",
    "Non-COVID": "non_COVID ({}).png",
    "Normal": "Normal ({}).png",
}


def full_count_tree(out: Path) -> Path:
    """A tree with the official number of files everywhere, each a copy of one tiny PNG."""
    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok
    data = png.tobytes()
    for (subset, split, cls), n in OFFICIAL_COUNTS.items():
        base = out / SUBSET_DIRS[subset] / SUBSET_DIRS[subset] / SPLIT_DIRS[split] / cls
        for kind in ("images", *MASK_DIRS[subset]):
            (base / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (base / kind / PATTERNS[cls].format(f"{split}{i}")).write_bytes(data)
    return out


def bench_scan(tmp: Path) -> None:
    root = full_count_tree(tmp / "full")
    t0 = time.perf_counter()
    files = sum(len(f) for _, _, f in os.walk(root))
    t_walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = scan(root)
    t_scan = time.perf_counter() - t0
    print(f"scan: {len(index):,} samples ({files:,} files)")
    print(f"  os.walk     {t_walk:7.3f} s")
    print(f"  covidqu     {t_scan:7.3f} s   ratio {t_scan / t_walk:5.2f}x")
    shutil.rmtree(root)


class HandWritten(Dataset):
    """The least a loop needs: decode, resize, scale; no checks, no augmentation. It reads the
    files a covidqu sample reads (the image, the target's mask and, for infection, the lung
    mask) and returns the same tensors, so that the two do the same work."""

    def __init__(self, samples: list, size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, path: Path) -> torch.Tensor:
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(mask > 0).float()[None]

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = cv2.imread(str(s.image), cv2.IMREAD_GRAYSCALE)
        img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(img).float().div_(255).sub_(0.449).div_(0.226)[None]
        item = {"image": x, "label": s.label, "id": s.id}
        if s.subset == "infection":
            item["mask"] = self._mask(s.infection_mask)
            item["lung"] = self._mask(s.lung_mask)
        else:
            item["mask"] = self._mask(s.lung_mask)
        return item


def throughput(loader: DataLoader, batches: int, finish=None) -> float:
    """Samples per second over ``batches`` batches, once the first is ready; ``finish(batch)``,
    where given, is timed with each batch (uint8 batches made float, as the training device
    does; here on the CPU, beside the workers).

    The loaders are not persistent: dropping the iterator stops (and joins) its workers, so the
    batches they prefetched do not run on into the next loader's measurement. With persistent
    workers they would, and the loader measured after a slow one would pay for its leftovers.
    """
    it = iter(loader)
    next(it)  # workers started, first batch ready
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        if finish is not None:
            b = finish(b)
        n += b["image"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del it, b
    gc.collect()
    return rate


def datamodule_class(root: Path) -> type:
    """The lung subset's DataModule where the tree has it, else the infection subset's."""
    return LungDataModule if "lung" in scan(root).subset_dirs else InfectionDataModule


def bench_loading(root: Path, workers: int, size: int, batches: int, batch_size: int) -> None:
    loading = {"batch_size": batch_size, "num_workers": workers, "persistent_workers": False}
    dm = datamodule_class(root)(root=root, image_size=size, augment=None, **loading)
    dm.setup("fit")
    samples = dm.datasets["train"].samples
    plain = DataLoader(
        HandWritten(samples, size),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
    )
    framework = dm.train_dataloader()
    rates = {}
    for _ in range(2):  # alternate, so that caches and clocks treat both alike
        rates.setdefault("hand", []).append(throughput(plain, batches))
        rates.setdefault("covidqu", []).append(throughput(framework, batches))
    hand, ours = max(rates["hand"]), max(rates["covidqu"])
    print(
        f"loading: {len(samples):,} train images at {size} px, "
        f"{workers} workers, batch {batch_size}"
    )
    print(f"  hand-written {hand:8.0f} samples/s")
    print(f"  covidqu      {ours:8.0f} samples/s   ratio {hand / ours:5.2f}x time per sample")


class HandPacked(Dataset):
    """The least a loop over the packed arrays needs: index the maps, normalise, and return the
    tensors of a covidqu batch (same keys, dtypes and values), nothing else."""

    def __init__(self, arrays: dict, rows: list[int], ids: list[str], with_lung: bool) -> None:
        self.images = np.asarray(arrays["images"])
        self.masks = np.asarray(arrays["infection" if with_lung else "lung"])
        self.lungs = np.asarray(arrays["lung"]) if with_lung else None
        self.labels, self.rows, self.ids = arrays["labels"], rows, ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        x = torch.from_numpy(self.images[r].copy()).float().div_(255).sub_(0.449).div_(0.226)
        item = {
            "image": x[None],
            "label": int(self.labels[r]),
            "id": self.ids[i],
            "mask": torch.from_numpy(self.masks[r].copy()).float()[None],
        }
        if self.lungs is not None:
            item["lung"] = torch.from_numpy(self.lungs[r].copy()).float()[None]
        return item


def light_augment() -> list:
    """``augment=light`` (conf/augment/light.yaml), as the config builds it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "augment" / "light.yaml"
    return list(instantiate(OmegaConf.load(conf).train))


def bench_packed(
    root: Path, cache_dir: Path, workers: int, size: int, batches: int, batch_size: int
) -> None:
    """The DataModule's defaults from PNG files against its defaults from the packed cache
    (uint8 batches, made float here as the training device would), with augment ``none`` and
    ``light``; and the packed cache with float batches made in the workers, and a hand-written
    loop over the same arrays."""
    cls = datamodule_class(root)
    loading = {"batch_size": batch_size, "num_workers": workers, "persistent_workers": False}
    common = {"root": root, "image_size": size, "pin_memory": False, **loading}
    t0 = time.perf_counter()
    first = cls(**common, cache="packed", cache_dir=cache_dir)
    first.prepare_data()  # packs (every split, once) unless already packed
    t_pack = time.perf_counter() - t0
    contenders = {  # (augment, cache, normalise): data.normalise=auto unless named
        ("none", "none", "auto"),
        ("none", "packed", "auto"),
        ("none", "packed", "loader"),
        ("light", "none", "auto"),
        ("light", "packed", "auto"),
    }
    loaders, finishers, keep = {}, {}, {}
    for aug, cache, normalise in sorted(contenders):
        dm = cls(
            **common,
            cache=cache,
            cache_dir=cache_dir,
            normalise=normalise,
            augment=light_augment() if aug == "light" else None,
        )
        dm.setup("fit")
        key = (aug, cache, normalise)
        loaders[key] = dm.train_dataloader()
        finishers[key] = partial(dm.on_after_batch_transfer, dataloader_idx=0)
        keep[key] = dm
    packed_default = keep[("none", "packed", "auto")]
    assert packed_default.normalise == "device"  # the packed default: uint8 batches
    reader = packed_default.reader
    ds = packed_default.datasets["train"]
    rows = [reader._row(s)[1] for s in ds.samples]
    hand = HandPacked(reader.arrays["train"], rows, [s.id for s in ds.samples], ds._with_lung)
    loaders[("none", "hand", "loader")] = DataLoader(
        hand,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=True,
    )
    rates: dict = {}
    for _ in range(3):  # alternate, so that caches, clocks and other load treat all alike
        for key, loader in loaders.items():
            rates.setdefault(key, []).append(throughput(loader, batches, finishers.get(key)))
        u8 = ("none", "packed", "auto")
        rates.setdefault("u8_loader_only", []).append(throughput(loaders[u8], batches))
    best = {k: max(v) for k, v in rates.items()}
    print(
        f"packed cache: {len(ds):,} train images of the {cls.subset} subset at {size} px, "
        f"{workers} workers, batch {batch_size} (packed every split in {t_pack:.1f} s)"
    )
    print("  defaults (data.normalise=auto: uint8 batches from the cache), samples/s:")
    print(f"  {'augment':<8} {'png':>10} {'packed':>10} {'packed/png':>11}")
    for aug in ("none", "light"):
        png, pck = best[(aug, "none", "auto")], best[(aug, "packed", "auto")]
        print(f"  {aug:<8} {png:10.0f} {pck:10.0f} {pck / png:10.2f}x")
    png = best[("none", "none", "auto")]
    loader_only = best["u8_loader_only"]
    print(
        f"  packed, uint8 batches as the loader gives them (made float on a GPU, not here) "
        f"{loader_only:8.0f} samples/s: {loader_only / png:5.2f}x png"
    )
    flt = best[("none", "packed", "loader")]
    hand_rate = best[("none", "hand", "loader")]
    print(
        f"  packed, data.normalise=loader (float batches from the workers) {flt:8.0f} "
        f"samples/s: {flt / png:5.2f}x png"
    )
    print(
        f"  hand-written loop over the packed arrays (float batches) {hand_rate:8.0f} "
        f"samples/s; covidqu packed float / hand-written {flt / hand_rate:5.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="a COVID-QU-Ex tree for loading")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-scan", action="store_true", help="leave out the scan benchmark")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where to pack (default: temp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_scan:
            bench_scan(tmp)
        root = args.root or generate(tmp / "synth", per_class=200, size=256, seed=0)
        bench_loading(root, args.workers, args.size, args.batches, args.batch_size)
        cache = args.cache_dir or tmp / "cache"
        bench_packed(root, cache, args.workers, args.size, args.batches, args.batch_size)


if __name__ == "__main__":
    main()
