"""What every loss shares: the shapes of logits and target checked against ``mode``, and
per-class weights checked."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from covidqu.models.shapes import check_mode, check_segmentation

#: The classification losses, for messages that point a classification task to them.
CLASSIFICATION_LOSSES = "loss=ce, loss=ce_smooth or loss=focal"


def check_class_list(values: Sequence[float] | None, key: str) -> Tensor | None:
    """One finite weight >= 0 per class (not all zero) as a tensor, or ``None``."""
    if values is None:
        return None
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} must be a list of numbers, one per class; got {values!r}") from err
    if not floats:
        raise ValueError(f"{key} is an empty list; give one number per class or null")
    bad = [v for v in floats if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"{key} must hold finite numbers >= 0; got {floats}")
    if sum(floats) == 0:
        raise ValueError(f"{key} must not be all zero; got {floats}")
    return torch.tensor(floats, dtype=torch.float32)


class Loss(nn.Module):
    """Shared validation: logits and target shapes against ``mode``."""

    #: The name a user types (``loss=<name>``), used in error messages.
    config_name: str = "loss"
    #: Whether 2-D (B x C) classification logits are accepted.
    supports_classification: bool = False

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = check_mode(mode, "loss.mode")

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def _prepare(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Validate shapes and return float32 logits with a target in the canonical layout."""
        name = self.config_name
        if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
            raise TypeError(f"{name}: logits and target must be tensors")
        if logits.dim() == 2:
            if not self.supports_classification:
                raise ValueError(
                    f"loss={name} is a segmentation loss and got 2-D classification logits "
                    f"{tuple(logits.shape)}; for task=classify use {CLASSIFICATION_LOSSES}"
                )
            if self.mode != "multiclass":
                raise ValueError(
                    f"loss={name} got classification logits {tuple(logits.shape)} with "
                    "loss.mode=binary; classification needs loss.mode=multiclass (task.mode)"
                )
            if target.dim() != 1 or target.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"loss={name}: classification target must be int64 of shape (B,) = "
                    f"({logits.shape[0]},) for logits {tuple(logits.shape)}; got "
                    f"{tuple(target.shape)}"
                )
            if target.is_floating_point():
                raise ValueError(
                    f"loss={name}: classification target must hold int64 class indices, got "
                    f"{target.dtype}"
                )
            return logits.float(), target.long()
        logits, target = check_segmentation(
            logits,
            target,
            self.mode,
            who=f"loss={name}",
            key="loss.mode",
            also=" (segmentation) or B x C (classification)",
        )
        return logits.float(), (target.float() if self.mode == "binary" else target)
