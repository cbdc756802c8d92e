"""A training epoch of covidqu against a hand-written PyTorch loop on the same data.

covidqu runs as ``python -m covidqu.train`` does: the DataModule (its resumable, seeded loader),
the task's LightningModule with its metrics, the csv logger, every default callback (checkpoints,
early stopping, learning-rate monitor, progress bar), composed from ``conf/``. The hand-written
loop trains a fresh copy of the same network with the same loss and optimizer over a plain
DataLoader of the same dataset (same batch size, workers, shuffling; with ``augment=gpu_*`` the
same batched augmentation on the device; with ``data.normalise=device`` the same conversion
there), and computes nothing else.

Both run two epochs; the second is timed (workers, allocator and kernels are warm by then), from
the start of the epoch to the end of its last training step: loading, forward, backward, step,
and for covidqu the per-step metrics, logging and callbacks. Validation is not timed (the
hand-written loop has none). A third run repeats one batch already in memory for as many steps:
the compute alone, so that ``1 - compute / epoch`` is the share of the epoch spent waiting on
data (on a GPU: whether loading starves it). Runs alternate, best of ``--repeats``; the ratio
is hand-written time over covidqu time, so 1.0 means no overhead (aim: at least 0.95).

    python experiments/bench_epoch.py --root ../shared/data/covidqu-real [--task infection]
        [--size 128] [--per-class 40] [--encoder resnet18] [--workers 2] [--device cpu|cuda]
        [--set data.cache=packed ...] [--compare-cache]

``--compare-cache`` times covidqu alone, from the PNG files against the packed cache (its
defaults otherwise: uint8 batches made float on the device), and prints the share of each epoch
spent waiting on data as covidqu's meter logs it (``perf/data_wait``). ``--set`` passes further
overrides to covidqu (and through the DataModule, to the dataset both loops share).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from covidqu.data.datasets import finish_batch
from covidqu.train.run import build, instantiate_all

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    """Seconds from the start of each training epoch to the end of its last step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            sync(self.device)
            self.seconds.append(time.perf_counter() - self.t0)


def config(args: argparse.Namespace, out: Path, extra: list[str] | None = None):
    overrides = [
        f"task={args.task}",
        f"data.root={args.root}",
        f"encoder={args.encoder}",
        "encoder.weights=null",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.limit_per_class={args.per_class}",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.limit_val_batches=1",
        "test=false",
        "logger=csv",
        f"paths.output_dir={out}",
        *args.set,
        *(extra or []),
    ]
    if args.device == "cuda":
        overrides.append("module.channels_last=true")
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=overrides)


def covidqu_epoch(cfg, device: str) -> tuple[float, float]:
    """The timed epoch's seconds, and its share spent waiting on data as covidqu's own meter
    (``perf/data_wait``, the default callbacks' ``data_wait``) logged it."""
    torch.manual_seed(0)
    datamodule, module = build(cfg)
    timer = EpochTimer(device)
    callbacks = [*instantiate_all(cfg.callbacks), timer]
    loggers = instantiate_all(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule)
    wait = trainer.callback_metrics.get("perf/data_wait")
    return timer.seconds[-1], float("nan") if wait is None else float(wait)


def compare_caches(args: argparse.Namespace, tmp: Path) -> None:
    """covidqu's epoch from the PNG files (data.cache=none) and from the packed cache, its
    defaults otherwise (uint8 batches with the cache), alternating; the data wait of each as
    its meter measured it."""
    runs: dict[str, list[tuple[float, float]]] = {"none": [], "packed": []}
    for r in range(args.repeats):
        for cache in runs:
            cfg = config(
                args, tmp / f"{cache}{r}", [f"data.cache={cache}", f"paths.cache_dir={tmp}"]
            )
            runs[cache].append(covidqu_epoch(cfg, args.device))
    (png_s, png_wait), (pck_s, pck_wait) = (min(v) for v in runs.values())
    print(
        f"\n{args.task}, U-Net/{args.encoder}, {args.size} px, batch {args.batch}, "
        f"{args.per_class} images per class, {args.workers} workers, {args.device}: covidqu's "
        f"timed epoch, best of {args.repeats}, and its data wait (perf/data_wait)"
    )
    print(f"  PNG files     {png_s:7.2f} s/epoch   data wait {png_wait:4.0%}")
    print(f"  packed cache  {pck_s:7.2f} s/epoch   data wait {pck_wait:4.0%}")
    print(f"  packed / PNG speed {png_s / pck_s:5.2f}x")


def hand_written_epoch(cfg, device: str, compute_only: bool = False) -> float:
    torch.manual_seed(0)
    datamodule, _ = build(cfg)  # only for its dataset: the data both loops read
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    net = instantiate(cfg.model).to(device)
    loss_fn = instantiate(cfg.loss).to(device)
    channels_last = device == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg.optimizer.lr))
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=int(cfg.data.batch_size),
        shuffle=True,
        drop_last=len(dataset) > int(cfg.data.batch_size),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device == "cuda",
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    net.train()
    seconds = 0.0
    held = next(iter(loader)) if compute_only else None
    augment = datamodule.device_augment
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        for i, batch in enumerate([held] * len(loader) if compute_only else loader):
            if augment is not None or datamodule.normalise == "device":
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "id"}
            if datamodule.normalise == "device":  # uint8 batches: made float on the device
                batch = finish_batch(batch, datamodule.mean, datamodule.std)
            if augment is not None:  # augment=gpu_*: the same batched augmentation, on device
                batch = augment(batch, key=(0, 0, i, 0), mean=datamodule.mean, std=datamodule.std)
            x = batch["image"].to(device, non_blocking=True)
            y = batch["mask"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="a COVID-QU-Ex tree (real, or synthetic)")
    ap.add_argument("--task", default="infection", choices=["lung", "infection"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], help="further covidqu overrides")
    ap.add_argument(
        "--compare-cache",
        action="store_true",
        help="covidqu from PNG files against the packed cache, with the data wait of each",
    )
    args = ap.parse_args()

    if args.compare_cache:
        with tempfile.TemporaryDirectory() as tmp:
            compare_caches(args, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, Path(tmp) / "run")
        if args.device == "cuda":
            cfg.trainer.precision = "bf16-mixed"
        hand, ours, compute = [], [], []
        for r in range(args.repeats):  # alternate so that both see the same machine state
            compute.append(hand_written_epoch(copy.deepcopy(cfg), args.device, compute_only=True))
            hand.append(hand_written_epoch(copy.deepcopy(cfg), args.device))
            cfg.paths.output_dir = str(Path(tmp) / f"run{r}")
            ours.append(covidqu_epoch(copy.deepcopy(cfg), args.device)[0])
    h, o, c = min(hand), min(ours), min(compute)
    steps = "epochs of " + " ".join(args.set) if args.set else "epochs"
    print(
        f"\n{args.task}, U-Net/{args.encoder}, {args.size} px, batch {args.batch}, "
        f"{args.per_class} images per class, {args.workers} workers, {args.device}, timed {steps}"
    )
    print(f"  compute only       {c:7.2f} s/epoch   (one batch held in memory: no loading)")
    print(f"  hand-written loop  {h:7.2f} s/epoch   waits on data {max(0.0, 1 - c / h):4.0%}")
    print(
        f"  covidqu            {o:7.2f} s/epoch   waits on data {max(0.0, 1 - c / o):4.0%}, "
        f"speed ratio {h / o:5.2f}x (aim >= 0.95)"
    )


if __name__ == "__main__":
    main()
