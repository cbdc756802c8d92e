"""Training-step overhead: the covidqu LightningModule + Trainer against a hand-written loop.

Both train the same U-Net on the same in-memory batches (no data loading, so only the
framework's own cost shows): forward, loss, backward, optimizer step. The framework also logs
the loss and updates the split-level metrics every step, as in a real run. Measured side by side,
alternating, best of the repeats; the ratio should stay close to 1.

    python experiments/bench_train.py [--size 128] [--batch 8] [--steps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import pytorch_lightning as pl
import torch

from covidqu.models.losses import BCELoss, DiceLoss, WeightedSum
from covidqu.models.metrics import SegmentationMetrics
from covidqu.models.networks import build_segmentation_model
from covidqu.models.segmentation import SegmentationModule


def make_batches(n: int, batch: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(batch, 1, size, size, generator=g)
        y = (torch.rand(batch, 1, size, size, generator=g) > 0.6).float()
        out.append(
            {
                "image": x,
                "mask": y,
                "label": torch.zeros(batch, dtype=torch.long),
                "id": [f"{i}-{j}" for j in range(batch)],
            }
        )
    return out


def loss_fn() -> WeightedSum:
    return WeightedSum({"dice": DiceLoss("binary"), "bce": BCELoss("binary")})


def hand_written(net: torch.nn.Module, batches: list[dict], device: str) -> float:
    net = net.to(device).train()
    fn = loss_fn()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        x, y = b["image"].to(device, non_blocking=True), b["mask"].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = fn(net(x), y)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t0


class _Timer(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def framework(net: torch.nn.Module, batches: list[dict], device: str) -> float:
    module = SegmentationModule(
        net=net,
        loss=loss_fn(),
        metrics=SegmentationMetrics(mode="binary", num_classes=1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = build_segmentation_model("unet", "resnet18", encoder_weights=None)
    batches = make_batches(args.steps, args.batch, args.size)
    hand_written(copy.deepcopy(base), batches[:2], args.device)  # warm-up (allocator, kernels)
    hand, ours = [], []
    for _ in range(args.repeats):  # alternate so that both see the same machine state
        hand.append(hand_written(copy.deepcopy(base), batches, args.device))
        ours.append(framework(copy.deepcopy(base), batches, args.device))
    h, o = min(hand), min(ours)
    print(
        f"U-Net/ResNet-18, {args.steps} steps of {args.batch} x 1 x {args.size}^2 on {args.device}"
    )
    print(f"  hand-written loop  {h / args.steps * 1e3:8.1f} ms/step")
    print(f"  covidqu module     {o / args.steps * 1e3:8.1f} ms/step   ratio {o / h:5.2f}x")


if __name__ == "__main__":
    main()
