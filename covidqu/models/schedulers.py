"""Learning-rate schedules that need to know the length of training.

Configs give them as partials (``_partial_: true``); the LightningModule completes them with the
optimizer and, where the signature asks for it, ``total_steps`` (Lightning's estimate of the
optimizer steps of the whole run, after accumulation and across devices).
"""

from __future__ import annotations

import math
from typing import Any

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
    optimizer: Optimizer, total_steps: int, max_lr_factor: float = 10.0, **options: Any
) -> OneCycleLR:
    """One-cycle policy over ``total_steps`` optimizer steps (stepped every step), rising to a
    peak of ``max_lr_factor`` times each parameter group's configured ``optimizer.lr``, then
    annealing far below it. ``options`` go to :class:`torch.optim.lr_scheduler.OneCycleLR`
    (``pct_start``: the share of the steps spent rising; ``anneal_strategy``, ...)."""
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, int(total_steps)), **options)
