"""Augmentation benchmark: the batched device path against albumentations, on the same batches.

Each pair (``light`` / ``gpu_light``, and with ``--strong`` also ``strong`` / ``gpu_strong``,
from ``conf/augment``) starts from the same decoded 8-bit images and masks, already in memory,
and ends with the augmented, normalised, collated batch on ``--device``:

- albumentations (``light``): per sample, the config's transforms on the image and both masks,
  normalise, collate, transfer (what one loader worker does, then the transfer);
- batched (``gpu_light``): per sample, normalise; collate, transfer, then
  :class:`~covidqu.data.device_augment.BatchAugment` on the whole batch.

Decoding is left out of both. The two alternate, twice, and the better rate of each is kept.
``gpu_strong`` has no CLAHE (see conf/augment/gpu_strong.yaml): its ratio is against a CPU
pipeline that does one transform more.

    python experiments/bench_augment.py [--root ROOT] [--device cpu|cuda] [--size 256]
        [--batch-size 32] [--batches 20] [--strong]

``--root`` defaults to ``../shared/data/covidqu-real`` (real infection-subset CXRs) when it
exists, else a synthetic tree is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from covidqu.data.datamodule import InfectionDataModule
from covidqu.data.datasets import normalise
from covidqu.data.synth import generate
from covidqu.data.transforms import build_transform

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT.parent / "shared" / "data" / "covidqu-real"


def augment_group(name: str):
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"augment={name}"])
    return instantiate(cfg.augment)


def decoded(root: Path, size: int, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` training images with their lung and infection masks, read and resized once."""
    dm = InfectionDataModule(root=root, image_size=size, num_workers=0)
    dm.setup("fit")
    ds = dm.datasets["train"]
    resize = build_transform(size)
    out = []
    for sample in ds.samples[:count]:
        image = ds.reader.image(sample)
        masks = [ds.reader.mask(sample, kind) for kind in ("lung", "infection")]
        r = resize(image=image, masks=masks)
        out.append((r["image"], *r["masks"]))
    if len(out) < count:
        out = [out[i % len(out)] for i in range(count)]  # a small tree: repeat it
    return out


def collate(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device) -> dict:
    image = torch.stack([normalise(img) for img, _, _ in items])
    lung = torch.stack([torch.from_numpy(m).float()[None] for _, m, _ in items])
    inf = torch.stack([torch.from_numpy(m).float()[None] for _, _, m in items])
    batch = {"image": image, "mask": inf, "lung": lung}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rate(step: Callable[[int], dict], batches: int, batch_size: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(0)  # warm-up: kernels, caches
    sync()
    t0 = time.perf_counter()
    for b in range(batches):
        step(b)
    sync()
    return batches * batch_size / (time.perf_counter() - t0)


def bench_pair(cpu_name: str, data: list, args: argparse.Namespace, device: torch.device) -> None:
    n = args.batch_size
    cpu = build_transform(args.size, list(augment_group(cpu_name).train), seed=0)
    gpu = augment_group(f"gpu_{cpu_name}").device

    def albumentations_step(b: int) -> dict:
        items = data[b * n : (b + 1) * n]
        moved = []
        for image, lung, inf in items:
            out = cpu(image=image, masks=[lung, inf])
            moved.append((out["image"], *out["masks"]))
        return collate(moved, device)

    def batched_step(b: int) -> dict:
        batch = collate(data[b * n : (b + 1) * n], device)
        return gpu(batch, key=(0, 0, b, 0), mean=0.449, std=0.226)

    rates: dict[str, list[float]] = {"cpu": [], "gpu": []}
    for _ in range(2):  # alternate, so that caches and clocks treat both alike
        rates["cpu"].append(rate(albumentations_step, args.batches, n, device))
        rates["gpu"].append(rate(batched_step, args.batches, n, device))
    ours, theirs = max(rates["gpu"]), max(rates["cpu"])
    print(f"  {cpu_name:<12} {theirs:9.0f} samples/s   (albumentations, per sample)")
    print(f"  gpu_{cpu_name:<8} {ours:9.0f} samples/s   ratio {ours / theirs:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=REAL if REAL.is_dir() else None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--strong", action="store_true", help="also strong against gpu_strong")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        root = args.root or generate(Path(d) / "synth", per_class=120, size=256, seed=0)
        data = decoded(root, args.size, (args.batches + 1) * args.batch_size)
    where = "real" if args.root else "synthetic"
    print(
        f"augmentation: {len(data)} {where} images at {args.size} px, batch {args.batch_size}, "
        f"device {device} (torch threads {torch.get_num_threads()})"
    )
    for name in ("light", "strong") if args.strong else ("light",):
        bench_pair(name, data, args, device)


if __name__ == "__main__":
    main()
