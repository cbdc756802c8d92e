"""Learning-rate schedules that need to know the length of training.

Configs give them as partials (``_partial_: true``); the LightningModule completes them with the
optimizer and, where the signature asks for it, ``total_steps`` (Lightning's estimate of the
optimizer steps of the whole run, after accumulation and across devices).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay.

    Args:
        optimizer: the optimizer whose learning rates are scaled.
        total_steps: optimizer steps of the whole run (stepped every step).
        warmup_fraction: share of the steps spent rising linearly from 0 to the base rate.
        min_lr_ratio: the rate at the end, as a fraction of the base rate.
    """
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    total = max(1, int(total_steps))
    warmup = int(total * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    max_lr_factor: float = 10.0,
    pct_start: float = 0.3,
) -> OneCycleLR:
    """One-cycle policy peaking at ``max_lr_factor`` times the optimizer's configured rate.

    Args:
        optimizer: the optimizer; its ``lr`` is the starting point of the cycle's peak.
        total_steps: optimizer steps of the whole run (stepped every step).
        max_lr_factor: peak rate = configured ``optimizer.lr`` x this factor.
        pct_start: share of the steps spent rising to the peak.
    """
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    return OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(1, int(total_steps)), pct_start=pct_start
    )
