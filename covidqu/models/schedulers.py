"""Learning-rate schedules that need to know the length of training, and what becomes of them
when a run resumes with another length.

Configs give them as partials (``_partial_: true``); the LightningModule completes them with the
optimizer and, where the signature asks for it, ``total_steps`` (Lightning's estimate of the
optimizer steps of the whole run, after accumulation and across devices).

A run resumed from a checkpoint may end at another step than the one it was saved by
(``trainer.max_epochs``, ``data.batch_size``, the number of processes, ... changed). Every
checkpoint records the steps its step-counted schedule was built for (:class:`StepPlan`), and
before the first step of the resumed run :func:`plan_steps` compares them with the step this run
ends at. Each schedule says what then happens:

- ``warmup_cosine`` (it takes ``stretch``) is rebuilt: from the step reached, the rest of it is
  stretched or squeezed over the steps left, so the rate goes on from the value it had and
  reaches its end value at the run's new last step. A decay keeps its meaning when stretched.
- ``one_cycle``, and any schedule that takes ``total_steps`` but not ``stretch``, is refused with a
  :class:`~covidqu.errors.ConfigError` naming the setting that changed. A cycle stretched mid-way
  would move its peak and its momentum cycle; kept, it would step past its end (torch raises) or
  stop mid-way.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from covidqu.errors import ConfigError

log = logging.getLogger(__name__)

#: ``[optimizer step, schedule step]`` points, linear in between (see :func:`position`).
Stretch = list[list[float]]


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
    stretch: Sequence[Sequence[float]] | None = None,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay.

    Args:
        optimizer: the optimizer whose learning rates are scaled.
        total_steps: optimizer steps of the whole run (stepped every step).
        warmup_fraction: share of the steps spent rising linearly from 0 to the base rate.
        min_lr_ratio: the rate at the end, as a fraction of the base rate.
        stretch: how a resumed run whose length changed maps its optimizer steps onto the
            schedule's own ``total_steps`` (:func:`plan_steps`); ``None``: one to one.
    """
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    total = max(1, int(total_steps))
    warmup = int(total * warmup_fraction)
    points = [[float(s), float(p)] for s, p in stretch] if stretch else None

    def factor(step: float) -> float:
        if points is not None:
            step = position(points, step)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # a closure, not an object: LambdaLR then leaves it out of its state, and a resumed run
    # keeps the schedule configure_optimizers built for it
    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: Optimizer, total_steps: int, max_lr_factor: float = 10.0, **options: Any
) -> OneCycleLR:
    """One-cycle policy over ``total_steps`` optimizer steps (stepped every step), rising to a
    peak of ``max_lr_factor`` times each parameter group's configured ``optimizer.lr``, then
    annealing far below it. ``options`` go to :class:`torch.optim.lr_scheduler.OneCycleLR`
    (``pct_start``: the share of the steps spent rising; ``anneal_strategy``, ...). A run
    resumed with another number of steps is refused (see the module docstring)."""
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, int(total_steps)), **options)


# -- resuming ------------------------------------------------------------------------------------


def position(stretch: Sequence[Sequence[float]], step: float) -> float:
    """The schedule's own step at optimizer ``step``: linear between the points of ``stretch``,
    its first position before them and its last after them."""
    (s0, p0), rest = stretch[0], stretch[1:]
    if step <= s0:
        return p0
    for s1, p1 in rest:
        if step <= s1:
            return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
        s0, p0 = s1, p1
    return p0


def stretched(stretch: Sequence[Sequence[float]], step: int, end: int) -> Stretch:
    """``stretch`` as far as ``step``, then what was left of the schedule spread over the
    optimizer steps up to ``end``: the same position at ``step``, the same end position."""
    kept = [[float(s), float(p)] for s, p in stretch if s < step]
    return [*kept, [float(step), position(stretch, step)], [float(end), float(stretch[-1][1])]]


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps a step-counted schedule was built for, saved in every checkpoint
    (the recipe's ``schedule`` section): a resumed run tells from them whether its length
    changed."""

    #: The optimizer step the schedule ends at.
    total_steps: int
    #: Optimizer steps of one epoch (after accumulation, on each process).
    steps_per_epoch: int
    #: Processes that trained (``trainer.devices`` x ``trainer.num_nodes``).
    world_size: int
    #: For a schedule that takes it, its ``stretch``; ``None`` for one that does not.
    stretch: Stretch | None = None

    def factory_kwargs(self) -> dict[str, Any]:
        """What the schedule's partial is completed with."""
        if self.stretch is None:
            return {"total_steps": self.total_steps}
        return {"total_steps": round(self.stretch[-1][1]), "stretch": self.stretch}


@dataclass(frozen=True)
class RunSteps:
    """The optimizer steps of the run about to train, as its trainer counts them."""

    #: Lightning's estimate for the whole run, from step 0.
    estimated: int
    steps_per_epoch: int
    world_size: int
    max_epochs: int | None
    max_steps: int

    @classmethod
    def of(cls, trainer: Any) -> RunSteps:
        """Those of a Lightning trainer (after its estimate has set up the training data)."""
        estimated = int(trainer.estimated_stepping_batches)
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return cls(estimated, per_epoch, trainer.world_size, trainer.max_epochs, trainer.max_steps)

    def end(self, step: int, steps_per_epoch_then: int | None) -> int:
        """The optimizer step this run ends at when it resumes from ``step``: the epochs left, at
        this run's steps per epoch (those reached counted at the checkpoint's), capped by
        ``trainer.max_steps``."""
        if self.max_epochs is None or self.max_epochs < 0:  # no epoch limit: Lightning's steps
            return self.estimated
        reached = round(
            step * self.steps_per_epoch / (steps_per_epoch_then or self.steps_per_epoch)
        )
        end = step + max(0, self.max_epochs * self.steps_per_epoch - reached)
        return min(end, self.max_steps) if self.max_steps >= 0 else end


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint says of the step-counted schedule it was saved with."""

    #: The optimizer step reached.
    step: int
    #: Its :class:`StepPlan` as saved; ``None`` in a checkpoint written before plans were.
    plan: Mapping[str, Any] | None
    #: The settings its steps followed (the recipe's ``schedule.settings``), or ``None``.
    settings: Mapping[str, Any] | None
    #: The schedule's own state (a ``OneCycleLR``'s holds its ``total_steps``).
    state: Mapping[str, Any]

    @classmethod
    def of(cls, checkpoint: Mapping[str, Any]) -> Resumed:
        schedule = (checkpoint.get("covidqu") or {}).get("schedule") or {}
        states = checkpoint.get("lr_schedulers") or [{}]
        return cls(
            int(checkpoint.get("global_step") or 0),
            schedule.get("plan"),
            schedule.get("settings"),
            states[0] or {},
        )

    @property
    def total_steps(self) -> int | None:
        """The step its schedule ended at; ``None`` where the checkpoint does not tell."""
        total = (self.plan or {}).get("total_steps", self.state.get("total_steps"))
        return None if total is None else int(total)


def plan_steps(
    factory: Callable[..., Any],
    run: RunSteps,
    resumed: Resumed | None,
    settings: Mapping[str, Any] | None,
) -> StepPlan:
    """The steps to build the step-counted schedule ``factory`` for: this run's, or on a resume
    those it was built for, rebuilt from the step reached or refused where the run now ends
    elsewhere (see the module docstring). ``settings``: this run's, to name what changed."""
    stretchable = "stretch" in parameters(factory)
    total = run.estimated
    fresh = StepPlan(total, run.steps_per_epoch, run.world_size, _identity(total, stretchable))
    then = None if resumed is None else resumed.total_steps
    # a fresh run; a checkpoint that predates plans: built as it was then; or one saved before
    # any step (the state the LR finder restores): nothing of its schedule has run yet
    if then is None or resumed is None or resumed.step == 0:
        return fresh
    plan = resumed.plan or {}
    end = run.end(resumed.step, plan.get("steps_per_epoch"))
    before = (plan.get("stretch") or _identity(then, True)) if stretchable else None
    if end == then or end <= resumed.step:  # the same length, or nothing left to step
        return StepPlan(then, run.steps_per_epoch, run.world_size, before)
    name = _name(factory)
    changes, restore = _changes(resumed, settings, run.world_size)
    why = "; ".join(changes) or (
        "this checkpoint does not record the settings it was trained with: one of "
        f"{', '.join(settings or ['trainer.max_epochs', 'data.batch_size'])} changed, or the "
        "training split"
    )
    if not stretchable:
        back = ", ".join(restore) or "the settings it was trained with"
        raise ConfigError(
            f"the {name} schedule cannot resume this run: it was built for {then} optimizer "
            f"steps, and this run ends at step {end} ({why}). It is one cycle over the steps it "
            f"was built for. Resume with {back}, or train afresh: auto_resume=false (this run "
            "folder's checkpoints are then replaced), another hydra.run.dir, or no ckpt_path."
        )
    log.warning(
        "the %s schedule was rebuilt for this resumed run: %d optimizer steps when built, %d now "
        "(%s); from step %d the rate goes on from its value there and reaches its end at step %d",
        name, then, end, why, resumed.step, end,
    )  # fmt: skip
    return StepPlan(end, run.steps_per_epoch, run.world_size, stretched(before, resumed.step, end))


def _identity(total: int, stretchable: bool) -> Stretch | None:
    return [[0.0, 0.0], [float(total), float(total)]] if stretchable else None


def _changes(
    resumed: Resumed, settings: Mapping[str, Any] | None, world_size: int
) -> tuple[list[str], list[str]]:
    """What differs from the checkpoint's settings (``key: then ..., now ...``), and the
    overrides that restore them."""
    then, now = resumed.settings or {}, settings or {}
    keys = [k for k in now if k in then and then[k] != now[k]]
    changes = [f"{k}: {then[k]!r} in the checkpoint, {now[k]!r} now" for k in keys]
    restore = [f"{k}={then[k]}" for k in keys]
    processes = (resumed.plan or {}).get("world_size")
    device_keys = ("trainer.devices", "trainer.num_nodes")
    if processes not in (None, world_size) and not set(device_keys) & set(keys):
        changes.append(
            f"trainer.devices x trainer.num_nodes: {processes} processes in the checkpoint, "
            f"{world_size} now"
        )
        restore.append(f"{processes} processes (trainer.devices, trainer.num_nodes)")
    return changes, restore


def _name(factory: Callable[..., Any]) -> str:
    return getattr(getattr(factory, "func", factory), "__name__", "learning-rate")


def parameters(factory: Callable[..., Any]) -> set[str]:
    """The names ``factory`` takes (none where its signature cannot be read)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
