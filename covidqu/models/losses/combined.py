"""A weighted sum of named losses (``dice_bce``, ``dice_ce``, ``combo``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class WeightedSum(nn.Module):
    """A weighted sum of named losses: ``sum(weights[name] * losses[name](logits, target))``.

    After each call :attr:`last` maps every name to the detached value of its part, so a
    LightningModule can log ``<stage>/loss_<name>`` next to ``<stage>/loss``. A part with
    weight 0 is still computed (without gradient) and recorded, which lets a run monitor a loss
    it does not optimise.

    Args:
        losses: name -> built loss module (in Hydra, a mapping of ``_target_`` configs, which
            ``instantiate`` builds). Names become the keys of :attr:`last` and ``loss.weights``.
        weights: name -> weight (finite, >= 0, not all zero). Names left out weigh 1; names
            that are not in ``losses`` are an error. ``None`` weighs every part 1.
    """

    def __init__(
        self,
        losses: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(losses, Mapping) or len(losses) == 0:
            raise ValueError(
                f"loss.losses must be a non-empty mapping of name -> loss, got {losses!r}"
            )
        parts = dict(losses.items())
        for name, loss in parts.items():
            if not isinstance(loss, nn.Module):
                raise TypeError(
                    f"loss.losses.{name} must be a loss module (a config with _target_), got "
                    f"{type(loss).__name__}"
                )
        weights = dict(weights.items()) if weights is not None else {}
        unknown = sorted(set(weights) - set(parts))
        if unknown:
            raise ValueError(
                f"loss.weights names {unknown}, which are not parts of this loss; the parts are "
                f"{sorted(parts)} (add them under loss.losses or fix the names)"
            )
        resolved: dict[str, float] = {}
        for name in parts:
            value = weights.get(name, 1.0)
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"loss.weights.{name} must be a number, got {value!r}") from err
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"loss.weights.{name} must be a finite number >= 0, got {value}")
            resolved[name] = value
        if all(v == 0 for v in resolved.values()):
            raise ValueError(
                f"loss.weights are all zero ({resolved}); at least one part needs a weight > 0"
            )
        self.losses = nn.ModuleDict(parts)
        self.weights: dict[str, float] = resolved
        #: Detached value of each part from the latest call, by name.
        self.last: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Weighted sum of the parts for raw ``logits`` against ``target``."""
        total: Tensor | None = None
        last: dict[str, Tensor] = {}
        for name, loss in self.losses.items():
            weight = self.weights[name]
            if weight == 0:
                with torch.no_grad():
                    value = loss(logits, target)
                last[name] = value.detach()
                continue
            value = loss(logits, target)
            last[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        self.last = last
        assert total is not None  # at least one weight is > 0
        return total
