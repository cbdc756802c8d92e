"""Pixel-wise (and class-wise) losses: focal, cross-entropy and binary cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covidqu.models.losses.base import Loss, check_class_list


class FocalLoss(Loss):
    """Focal loss ``-alpha_t (1 - p_t) ** gamma log p_t``, averaged over pixels (or samples).

    Binary mode is the sigmoid focal loss of ``smp.losses.FocalLoss``; multiclass mode is the
    softmax focal loss over the channels, so it also serves classification (B x C logits with
    an int64 B target). Pixel-wise, so empty masks need no special case.

    Args:
        mode: ``binary`` (sigmoid, logits B x 1 x H x W) or ``multiclass`` (softmax, logits
            B x C x H x W or B x C).
        alpha: class balance. Binary: a number in [0, 1], the weight of foreground pixels
            (background gets ``1 - alpha``); ``None`` weighs both 1. Multiclass: a list of one
            weight >= 0 per class (in class order), or ``None`` for no weighting.
        gamma: focusing exponent >= 0; ``0`` gives (weighted) cross-entropy.
    """

    config_name = "focal"
    supports_classification = True

    def __init__(
        self,
        mode: str = "binary",
        alpha: float | Sequence[float] | None = None,
        gamma: float = 2.0,
    ) -> None:
        super().__init__(mode)
        if not math.isfinite(float(gamma)) or gamma < 0:
            raise ValueError(f"loss.gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.alpha = alpha
        self._binary: nn.Module | None = None
        weights = None
        if mode == "binary":
            if alpha is not None:
                if isinstance(alpha, Sequence) or not 0.0 <= float(alpha) <= 1.0:
                    raise ValueError(
                        f"loss.alpha={alpha!r}: with loss.mode=binary alpha is one number in "
                        "[0, 1] (the foreground weight) or null"
                    )
                alpha = float(alpha)
            self._binary = smp.losses.FocalLoss(mode="binary", alpha=alpha, gamma=self.gamma)
        elif alpha is not None:
            if not isinstance(alpha, Sequence) or isinstance(alpha, str):
                raise ValueError(
                    f"loss.alpha={alpha!r}: with loss.mode=multiclass alpha is a list of one "
                    "weight per class (class order) or null"
                )
            weights = check_class_list(alpha, "loss.alpha")
        self.register_buffer("class_weights", weights, persistent=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha!r}, gamma={self.gamma}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss for raw ``logits`` against ``target`` (see the module docstring for shapes)."""
        logits, target = self._prepare(logits, target)
        if self._binary is not None:
            return self._binary(logits, target)
        log_probs = F.log_softmax(logits, dim=1)
        log_pt = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_pt
        if self.gamma != 0:
            loss = loss * (1.0 - log_pt.exp()).clamp_min(0.0).pow(self.gamma)
        if self.class_weights is not None:
            if self.class_weights.numel() != logits.shape[1]:
                raise ValueError(
                    f"loss.alpha has {self.class_weights.numel()} weights but the logits have "
                    f"{logits.shape[1]} classes"
                )
            loss = loss * self.class_weights.to(loss.dtype)[target]
        return loss.mean()


class CrossEntropyLoss(Loss):
    """Cross-entropy over classes, for classification and multiclass segmentation.

    Wraps :func:`torch.nn.functional.cross_entropy`. Pixel-wise (or sample-wise), so empty
    masks need no special case.

    Args:
        mode: must be ``multiclass`` (logits B x C x H x W with an int64 B x H x W target, or
            B x C with an int64 B target). A binary mask target needs ``loss=bce``.
        label_smoothing: share of the target mass spread uniformly over all classes, in [0, 1).
        class_weights: one weight >= 0 per class, in class order (COVID-19, Non-COVID, Normal
            for classification; background, lung, infection for ``infection_multiclass``), or
            ``None`` for equal weights. The mean is weighted as in PyTorch.
    """

    config_name = "ce"
    supports_classification = True

    def __init__(
        self,
        mode: str = "multiclass",
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(mode)
        if mode != "multiclass":
            raise ValueError(
                f"loss={self.config_name} needs loss.mode=multiclass (got {mode!r}): a binary "
                "mask target (data.target=lung or infection) uses loss=bce or loss=dice_bce"
            )
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        weights = check_class_list(class_weights, "loss.class_weights")
        self.register_buffer("class_weights", weights, persistent=False)

    def extra_repr(self) -> str:
        weights = None if self.class_weights is None else self.class_weights.tolist()
        return (
            f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, class_weights={weights}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss for raw ``logits`` against ``target`` (see the module docstring for shapes)."""
        logits, target = self._prepare(logits, target)
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(
                f"loss.class_weights has {self.class_weights.numel()} weights but the logits have "
                f"{logits.shape[1]} classes; give one weight per class in class order"
            )
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)


class BCELoss(Loss):
    """Binary cross-entropy on logits, for binary mask targets.

    Wraps :func:`torch.nn.functional.binary_cross_entropy_with_logits`. A multi-class target is
    refused rather than quietly computed as something else: its classes are mutually exclusive,
    which is cross-entropy's job (``loss=ce``, ``loss=dice_ce``). Pixel-wise, so empty masks need
    no special case.

    Args:
        mode: must be ``binary`` (logits B x 1 x H x W, float target).
        pos_weight: weight of foreground pixels relative to background (> 0), e.g. the
            background / foreground pixel ratio for sparse infection masks; ``None`` for 1.
    """

    config_name = "bce"

    def __init__(self, mode: str = "binary", pos_weight: float | None = None) -> None:
        super().__init__(mode)
        if mode != "binary":
            raise ValueError(
                f"loss={self.config_name} needs a binary mask target (loss.mode=binary, got "
                f"{mode!r}); for a multi-class target or task=classify use loss=ce or "
                "loss=dice_ce (segmentation), with loss.class_weights to weigh classes"
                + ("" if pos_weight is None else " instead of loss.pos_weight")
            )
        weight = None
        if pos_weight is not None:
            if not math.isfinite(float(pos_weight)) or pos_weight <= 0:
                raise ValueError(f"loss.pos_weight must be a finite number > 0, got {pos_weight!r}")
            weight = torch.tensor([float(pos_weight)])
        self.register_buffer("pos_weight", weight, persistent=False)

    def extra_repr(self) -> str:
        weight = None if self.pos_weight is None else float(self.pos_weight)
        return f"mode={self.mode!r}, pos_weight={weight}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss for raw ``logits`` against ``target`` (see the module docstring for shapes)."""
        logits, target = self._prepare(logits, target)
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
