"""Region losses that score the overlap of predicted and true masks: Tversky, and its special
cases Dice and Jaccard, pooled over the batch; and Lovász."""

from __future__ import annotations

import math
from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor

from covidqu.models.losses.base import Loss


class TverskyLoss(Loss):
    """Tversky loss ``(1 - TI) ** gamma``, with ``TI = (TP + s) / (TP + a FP + b FN + s)``.

    TP, FP and FN are soft counts (probabilities times the one-hot target) pooled over the whole
    batch, per channel; the loss is the mean over the selected channels.

    Empty masks: the smoothing term ``s`` makes an empty target with an empty prediction score
    ``TI = 1`` (loss 0) and an empty target with predicted foreground ``TI = s / (s + a FP)``,
    so predicted foreground on an all-empty batch is penalised rather than ignored. Since counts
    are pooled over the batch, an empty image among non-empty ones adds its false positives to
    the pooled FP.

    Args:
        mode: ``binary`` (sigmoid, logits B x 1 x H x W) or ``multiclass`` (softmax, logits
            B x C x H x W with an int64 B x H x W target). Classification logits are rejected.
        alpha: weight of false positives (``a``), >= 0. ``alpha = beta = 0.5`` is Dice,
            ``alpha = beta = 1`` is Jaccard; ``beta > alpha`` favours sensitivity.
        beta: weight of false negatives (``b``), >= 0.
        gamma: exponent on ``1 - TI`` per channel (focal Tversky when ``gamma != 1``), > 0.
        smooth: added to numerator and denominator (``s``), >= 0; keeps empty masks defined.
        eps: lower bound of the denominator, > 0, for ``smooth = 0``.
        classes: multiclass only: channel indices averaged into the loss (e.g. ``[0, 1, 2]``);
            ``None`` takes the channels that ``include_background`` says.
        include_background: multiclass only, when ``classes`` is ``None``: average channel 0
            (the background) in as well. Off by default, so that the loss scores the classes
            the metrics score (their ``dice`` is the mean over the foreground classes).
    """

    config_name = "tversky"

    def __init__(
        self,
        mode: str = "binary",
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 1.0,
        smooth: float = 1.0,
        eps: float = 1e-7,
        classes: Sequence[int] | None = None,
        include_background: bool = False,
    ) -> None:
        super().__init__(mode)
        for key, value in (("alpha", alpha), ("beta", beta), ("smooth", smooth)):
            if not math.isfinite(float(value)) or value < 0:
                raise ValueError(f"loss.{key} must be a finite number >= 0, got {value!r}")
        if alpha + beta <= 0:
            raise ValueError(f"loss.alpha + loss.beta must be > 0, got {alpha} and {beta}")
        if gamma <= 0:
            raise ValueError(f"loss.gamma must be > 0, got {gamma!r}")
        if eps <= 0:
            raise ValueError(f"loss.eps must be > 0, got {eps!r}")
        if classes is not None:
            if mode != "multiclass":
                raise ValueError(
                    f"loss.classes={list(classes)} only applies to loss.mode=multiclass; "
                    "set it to null for a binary target"
                )
            classes = [int(c) for c in classes]
            if not classes:
                raise ValueError("loss.classes is an empty list; use null for all channels")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.smooth, self.eps = float(smooth), float(eps)
        self.classes = classes
        self.include_background = bool(include_background)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"smooth={self.smooth}, classes={self.classes}, "
            f"include_background={self.include_background}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss for raw ``logits`` against ``target`` (see the module docstring for shapes)."""
        logits, target = self._prepare(logits, target)
        if self.mode == "binary":
            probs = torch.sigmoid(logits)
            truth = target
        else:
            num_classes = logits.shape[1]
            probs = torch.softmax(logits, dim=1)
            truth = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        tp = (probs * truth).sum(dims)
        fp = (probs * (1.0 - truth)).sum(dims)
        fn = ((1.0 - probs) * truth).sum(dims)
        denom = (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(self.eps)
        score = (tp + self.smooth) / denom
        per_class = (1.0 - score).clamp_min(0.0)
        if self.gamma != 1.0:
            per_class = per_class.pow(self.gamma)
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < per_class.shape[0]]
            if bad:
                raise ValueError(
                    f"loss.classes={self.classes} names channels {bad} that the logits "
                    f"({per_class.shape[0]} channels) do not have"
                )
            per_class = per_class[self.classes]
        elif self.mode == "multiclass" and not self.include_background:
            per_class = per_class[1:]
        return per_class.mean()


class _OverlapLoss(TverskyLoss):
    """:class:`TverskyLoss` with false positives and negatives weighed alike (``weight``).

    Args:
        mode: ``binary`` (sigmoid, logits B x 1 x H x W) or ``multiclass`` (softmax over
            B x C x H x W logits, int64 B x H x W target). Classification logits are rejected.
        smooth: added to numerator and denominator, >= 0; keeps empty masks defined.
        eps: lower bound of the denominator, > 0.
        classes: multiclass only: channel indices averaged into the loss; ``None`` for the
            foreground channels (all with ``include_background``).
        include_background: multiclass only: see :class:`TverskyLoss`.
    """

    #: ``alpha = beta`` of the Tversky index.
    weight: float

    def __init__(
        self,
        mode: str = "binary",
        smooth: float = 1.0,
        eps: float = 1e-7,
        classes: Sequence[int] | None = None,
        include_background: bool = False,
    ) -> None:
        super().__init__(
            mode,
            alpha=self.weight,
            beta=self.weight,
            smooth=smooth,
            eps=eps,
            classes=classes,
            include_background=include_background,
        )


class DiceLoss(_OverlapLoss):
    """Soft Dice loss ``1 - (2 TP + 2s) / (2 TP + FP + FN + 2s)`` (pooled over the batch).

    The Tversky loss with ``alpha = beta = 0.5``; empty masks count as described there: empty
    truth and empty prediction give loss 0, predicted foreground on empty truth is penalised,
    never NaN. Arguments as in :class:`_OverlapLoss`.
    """

    config_name = "dice"
    weight = 0.5


class JaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss ``1 - (TP + s) / (TP + FP + FN + s)`` (pooled over the batch).

    The Tversky loss with ``alpha = beta = 1``; empty masks count as described there.
    Arguments as in :class:`_OverlapLoss`.
    """

    config_name = "jaccard"
    weight = 1.0


class LovaszLoss(Loss):
    """Lovász loss, a convex surrogate of the Jaccard loss (``smp.losses.LovaszLoss``).

    Binary mode uses the Lovász hinge on the logits; multiclass mode the Lovász-softmax over
    the classes present in the batch.

    Empty masks: with no foreground pixel the binary hinge reduces to the hinge of the most
    confident false positive (``relu(1 + max logit)``): finite, and zero once every logit is
    below -1. In multiclass mode a class absent from the batch is left out of the average, so
    only the present classes (background always is) count.

    Args:
        mode: ``binary`` (logits B x 1 x H x W, float target) or ``multiclass`` (logits
            B x C x H x W, int64 B x H x W target). Classification logits are rejected.
        per_image: compute the loss per image and average, instead of over the pooled batch.
    """

    config_name = "lovasz"

    def __init__(self, mode: str = "binary", per_image: bool = False) -> None:
        super().__init__(mode)
        self.per_image = bool(per_image)
        self._loss = smp.losses.LovaszLoss(mode=mode, per_image=self.per_image)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, per_image={self.per_image}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss for raw ``logits`` against ``target`` (see the module docstring for shapes)."""
        logits, target = self._prepare(logits, target)
        loss = self._loss(logits, target)
        if not isinstance(loss, Tensor):  # no class to average: zero with a graph
            loss = logits.sum() * 0.0 + float(loss)
        return loss
