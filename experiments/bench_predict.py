"""``predict`` over real images against a hand-written batched loop, side by side in one run.

Both read the same images with the same DataLoader workers and batch size, resize and
normalise them, run the same network, and write a mask PNG (at the input's size) and an overlay
PNG per image; ``predict`` adds its checks, bad-file handling and ``predictions.csv``. The ratio
(hand-written time / framework time, so higher is better for the framework) is its overhead;
the aim is >= 0.9x.

    python experiments/bench_predict.py [--root ROOT] [--images 500] [--workers 2]
        [--batch-size 16] [--repeats 2] [--device auto] [--ckpt CKPT]

The network is a small, randomly initialised U-Net (ResNet-18 encoder cut to three stages) at
256 px; without ``--ckpt`` its checkpoint is made by a two-step training run of covidqu on a
synthetic tree (the weights do not matter for speed). The images are the first ``--images`` of
the infection subset's image folders under ``--root``, linked (not copied) into one folder.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidqu.models.checkpoint import load_module
from covidqu.predict.run import predict, resolve_device

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL = PROJECT_ROOT.parent / "shared" / "data" / "covidqu-real"
SIZE = 256


def make_checkpoint(tmp: Path) -> Path:
    """A checkpoint of a tiny random U-Net at 256 px, written by covidqu's own training."""
    synth = tmp / "synth"
    py = sys.executable
    subprocess.run(
        [py, "-m", "covidqu.data", "synth", str(synth), "--per-class", "2", "--size", str(SIZE)],
        check=True,
        capture_output=True,
        cwd=PROJECT_ROOT,
    )
    run = tmp / "run"
    overrides = [
        f"data.root={synth}",
        "encoder=resnet18",
        "encoder.weights=null",
        "model.encoder_depth=3",
        "model.decoder_channels=[32,16,8]",
        f"data.image_size={SIZE}",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=csv",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(
        [py, "-m", "covidqu.train", *overrides], capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"training the benchmark model failed:\n{proc.stderr[-3000:]}")
    return run / "checkpoints" / "best.ckpt"


def link_images(root: Path, n: int, folder: Path) -> list[Path]:
    """The first ``n`` images of the infection subset (sorted), linked into ``folder``."""
    found = sorted(root.rglob("images/*.png"))[:n]
    if len(found) < n:
        raise SystemExit(f"only {len(found)} images under {root}; need {n}")
    folder.mkdir(parents=True)
    links = []
    for i, src in enumerate(found):
        link = folder / f"{i:05d}{src.suffix}"
        link.symlink_to(src)
        links.append(link)
    return links


class Files(Dataset):
    """Decode as gray, resize, normalise: the least a prediction loop needs."""

    def __init__(self, files: list[Path], mean: float, std: float) -> None:
        self.files, self.mean, self.std = files, mean, std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = cv2.imread(str(self.files[i]), cv2.IMREAD_GRAYSCALE)
        small = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(small).float().div_(255.0).sub_(self.mean).div_(self.std)
        return i, x.unsqueeze(0), image


def collate(items):
    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]), [m for *_, m in items]


def hand_written(
    net: torch.nn.Module, files: list[Path], out: Path, mean: float, std: float, args
) -> None:
    """Read, resize, normalise, forward, resize back, threshold, write mask and overlay."""
    out.mkdir(parents=True)
    loader = DataLoader(
        Files(files, mean, std),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
    )
    with torch.inference_mode():
        for indices, x, images in loader:
            probs = torch.sigmoid(net(x.to(args.device, non_blocking=True)).float()).cpu().numpy()
            for i, image, p in zip(indices, images, probs, strict=True):
                h, w = image.shape
                mask = (cv2.resize(p[0], (w, h), interpolation=cv2.INTER_LINEAR) > 0.5).astype(
                    np.uint8
                )
                cv2.imwrite(str(out / f"{files[i].stem}_mask.png"), mask * 255)
                bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                tinted = cv2.addWeighted(bgr, 0.55, np.full_like(bgr, (60, 200, 60)), 0.45, 0)
                bgr[mask > 0] = tinted[mask > 0]
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(bgr, contours, -1, (60, 200, 60), 1)
                cv2.imwrite(str(out / f"{files[i].stem}_overlay.png"), bgr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REAL)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ckpt", type=Path, default=None)
    args = parser.parse_args()
    args.device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = args.ckpt or make_checkpoint(tmp)
        files = link_images(args.root, args.images, tmp / "in")
        module = load_module(ckpt, map_location=args.device)
        mean, std = module.normalisation
        assert module.recipe["preprocess"]["image_size"] == SIZE

        def framework(folder: Path, out: Path) -> None:
            rows = predict(
                ckpt,
                folder,
                out,
                batch_size=args.batch_size,
                device=args.device,
                num_workers=args.workers,
                progress_bar=False,
            )
            assert all(r["status"] == "ok" for r in rows)

        runs = {
            "hand-written": lambda paths, out: hand_written(module, paths, out, mean, std, args),
            "covidqu predict": lambda paths, out: framework(paths[0].parent, out),
        }
        warm = link_images(args.root, 2 * args.batch_size, tmp / "warm")
        for name, run in runs.items():  # warm-up (first batches, lazy imports), not counted
            run(warm, tmp / f"warm_{name.split()[0]}")
        times: dict[str, list[float]] = {name: [] for name in runs}
        for k in range(1, args.repeats + 1):  # alternating, so a busy machine slows both alike
            for name, run in runs.items():
                t0 = time.perf_counter()
                run(files, tmp / f"out_{name.split()[0]}_{k}")
                times[name].append(time.perf_counter() - t0)
        same = [
            np.array_equal(
                cv2.imread(str(tmp / f"out_hand-written_1/{f.stem}_mask.png"), 0),
                cv2.imread(str(tmp / f"out_covidqu_1/{f.stem}_mask.png"), 0),
            )
            for f in files
        ]

    hand = statistics.median(times["hand-written"])
    print(
        f"predict over {len(files)} real images at {SIZE} px, batch {args.batch_size}, "
        f"{args.workers} workers, {args.device}, median of {args.repeats} alternating runs"
    )
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:16s} {med:7.2f} s  {len(files) / med:7.1f} images/s  {hand / med:5.2f}x")
    print(f"  identical masks: {sum(same)} of {len(same)}")


if __name__ == "__main__":
    main()
