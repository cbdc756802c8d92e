"""Training losses for segmentation and classification, built from config.

Every loss takes the network's raw logits and the batch target (see :mod:`covidqu.constants`)
and returns a scalar:

==========================  ===========================  ==============================
task                        logits                       target
==========================  ===========================  ==============================
binary segmentation         float B x 1 x H x W          float B x 1 x H x W in {0, 1}
multiclass segmentation     float B x C x H x W          int64 B x H x W in [0, C)
classification              float B x C                  int64 B in [0, C)
==========================  ===========================  ==============================

``mode`` is ``binary`` (one sigmoid channel: the ``lung`` and ``infection`` masks) or
``multiclass`` (softmax over channels: ``infection_multiclass`` and classification). The configs
in ``conf/loss/`` set it to ``${task.mode}``, so it follows the task; it is checked against the
shapes on every call, and a mismatch names the setting to change.

Empty masks (the infection masks of Non-COVID and Normal images are all zero) never make a loss
NaN. How each loss counts them is stated in its docstring; in short:

* Dice, Jaccard and Tversky pool their counts over the whole batch and carry a ``smooth`` term,
  so an empty target with an empty prediction scores a loss of 0, and an empty target with
  predicted foreground is penalised by how much foreground was predicted. (The smp versions
  instead drop channels without any true pixel from the loss, which leaves false positives on an
  all-empty batch unpunished.)
* Lovász treats an image without foreground as a hinge on its most confident false positive
  (binary) or leaves absent classes out of the average (multiclass).
* Pixel-wise losses (BCE, cross-entropy, focal) need no special case.

:class:`WeightedSum` combines named losses (``dice_bce``, ``dice_ce``, ``combo``) and remembers
the last value of each part in :attr:`WeightedSum.last` for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covidqu.models.shapes import check_mode, check_segmentation

__all__ = [
    "BCELoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "JaccardLoss",
    "LovaszLoss",
    "TverskyLoss",
    "WeightedSum",
]

_CLASSIFICATION_LOSSES = "loss=ce, loss=ce_smooth or loss=focal"


def _check_class_list(values: Sequence[float] | None, key: str) -> Tensor | None:
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


class _Loss(nn.Module):
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
                    f"{tuple(logits.shape)}; for task=classify use {_CLASSIFICATION_LOSSES}"
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


class TverskyLoss(_Loss):
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


class LovaszLoss(_Loss):
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


class FocalLoss(_Loss):
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
            weights = _check_class_list(alpha, "loss.alpha")
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


class CrossEntropyLoss(_Loss):
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
        weights = _check_class_list(class_weights, "loss.class_weights")
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


class BCELoss(_Loss):
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
