"""Evaluation metrics over a whole split, for segmentation and classification.

Both metric classes accumulate counts batch by batch (``update``) and compute the figures once
over everything seen (``compute``): a split's Dice is the Dice of all its pixels pooled, not a
mean of per-batch Dice values, so it does not depend on the batch size or on how images fall
into batches. Their states are summed across processes when Lightning syncs them under DDP.

In a LightningModule::

    self.val_seg = SegmentationMetrics(mode="binary")
    ...
    self.val_seg.update(logits, batch["mask"])               # each validation step
    ...
    values = self.val_seg.compute()                          # at the end of the epoch
    self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False)
    self.val_seg.reset()

Division by zero, one rule everywhere (whole-split and per-image figures alike): a ratio whose
denominator is zero is 1, because there was nothing it measures and so nothing got wrong.

* Dice and IoU are 1 when neither the truth nor the prediction has a positive pixel (a correct
  "no infection"); with an empty truth and any predicted positive they are 0.
* Sensitivity (TP / (TP + FN)) is 1 when the truth has no positive pixel.
* Specificity (TN / (TN + FP)) is 1 when the truth has no negative pixel.
* Precision (TP / (TP + FP)) is 1 when nothing is predicted positive; Dice and sensitivity still
  show a missed lesion as 0 then.

This matters because the infection masks of Non-COVID and Normal images are empty: under these
rules a model that predicts nothing on them scores 1 on those images, and any false positive
drops them to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from covidqu.constants import CLASSES, COVID, TARGETS
from covidqu.models.shapes import check_mode, check_segmentation

__all__ = [
    "IMAGE_KEYS",
    "SEGMENTATION_KEYS",
    "ClassificationMetrics",
    "SegmentationMetrics",
    "default_class_names",
    "per_image_scores",
]

#: The config key of the metrics' mode, named in errors.
_KEY = "module.metrics.mode"

#: Keys every segmentation result has (multiclass: means over the foreground classes).
SEGMENTATION_KEYS: tuple[str, ...] = ("dice", "iou", "sensitivity", "specificity", "precision")
#: Per-image means every segmentation result has beside them.
IMAGE_KEYS: tuple[str, ...] = ("dice_image", "iou_image")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the segmentation classes where none are given: those of the multi-class target
    with that many classes (background / lung / infection for 3), else generic ones."""
    if num_classes == 1:
        return ("foreground",)
    for target in TARGETS.values():
        if target.mode == "multiclass" and target.num_classes == num_classes:
            return target.classes
    return tuple(f"class{i}" for i in range(num_classes))


def _check_setup(
    mode: str, num_classes: int, threshold: float, class_names: Sequence[str] | None
) -> tuple[str, ...]:
    check_mode(mode, _KEY)
    if mode == "binary" and num_classes != 1:
        raise ValueError(
            f"mode=binary needs num_classes=1 (one sigmoid channel), got {num_classes}"
        )
    if mode == "multiclass" and num_classes < 2:
        raise ValueError(f"mode=multiclass needs num_classes >= 2, got {num_classes}")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} names {list(names)} for num_classes={num_classes}"
        )
    return names


def _per_image_counts(
    logits: Tensor, target: Tensor, mode: str, threshold: float, num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """True/false positive/negative pixel counts, int64 of shape B x C (C = 1 in binary mode)."""
    logits, target = check_segmentation(
        logits, target, mode, who="segmentation metrics", key=_KEY, num_classes=num_classes
    )
    b, c, h, w = logits.shape
    if mode == "binary":
        # strictly above: a pixel at exactly the threshold (logit 0 at 0.5) is negative
        pred = (torch.sigmoid(logits.float()) > threshold).reshape(b, 1, -1)
        truth = (target > 0.5).reshape(b, 1, -1)
        tp = (pred & truth).sum(-1)
        fp = (pred & ~truth).sum(-1)
        fn = (~pred & truth).sum(-1)
        tn = (~pred & ~truth).sum(-1)
        return tp.long(), fp.long(), fn.long(), tn.long()

    pred = logits.argmax(dim=1)
    # One confusion matrix per image (rows truth, columns prediction) via a single bincount.
    offset = torch.arange(b, device=logits.device).view(b, 1, 1) * (c * c)
    index = (offset + target * c + pred).reshape(-1)
    confusion = torch.bincount(index, minlength=b * c * c).view(b, c, c)
    tp = confusion.diagonal(dim1=1, dim2=2)
    fp = confusion.sum(dim=1) - tp
    fn = confusion.sum(dim=2) - tp
    tn = h * w - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, 1 where ``den`` is 0 (see the module docstring)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))


def _scores(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }


def _image_figures(per_class: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
    """Each image's figures (B) from its per-class ones (B x C): the channel in binary mode,
    the mean over the foreground classes in multiclass mode."""
    if mode == "binary":
        return {k: v[:, 0] for k, v in per_class.items()}
    return {k: v[:, 1:].mean(1) for k, v in per_class.items()}


class SegmentationMetrics(Metric):
    """Dice, IoU, sensitivity, specificity and precision over a whole split.

    The states are per-class pixel counts (int64, summed across batches and processes), and the
    figures are micro averages: computed once from the pooled counts. Zero denominators follow
    the module's rule (a ratio with nothing to measure is 1).

    :meth:`compute` returns float32 scalars under :data:`SEGMENTATION_KEYS` (``dice``, ``iou``,
    ``sensitivity``, ``specificity``, ``precision``). In multiclass mode those are the means over
    the foreground classes (1 .. C-1; class 0 is background), and ``dice_<name>``,
    ``iou_<name>`` are added for each foreground class (``dice_lung``, ``iou_infection``...).

    Per-image means stand beside the pooled figures, as the seed paper reports per image:
    ``dice_image`` and ``iou_image`` (the mean of each image's figure, with the empty-mask rule
    above; multiclass: each image's mean over the foreground classes) and, with ``covid_class``
    set, ``dice_covid`` and ``iou_covid``: that class's per-image figures averaged over the
    COVID-19 images only (label :data:`~covidqu.constants.COVID`, passed to :meth:`update`), the
    images whose infection masks are not empty. NaN when no COVID-19 image was seen.

    Args:
        mode: ``binary`` (logits B x 1 x H x W, positive where ``sigmoid > threshold``; target
            float B x 1 x H x W in {0, 1}) or ``multiclass`` (logits B x C x H x W, prediction
            the argmax; target int64 B x H x W in [0, C)).
        num_classes: 1 in binary mode; the number of channels (C >= 2) in multiclass mode.
        threshold: probability above which a binary pixel is predicted positive, in (0, 1).
            Unused in multiclass mode.
        class_names: one name per class, used in the per-class keys; defaults to background,
            lung, infection for 3 classes and ``class<i>`` otherwise.
        covid_class: the name of the class that only COVID-19 images show (``infection``), for
            ``dice_covid`` / ``iou_covid``; ``None`` leaves them out.
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: Tensor
    fp: Tensor
    fn: Tensor
    tn: Tensor
    image_sums: Tensor
    covid_sums: Tensor

    def __init__(
        self,
        mode: str = "binary",
        num_classes: int = 1,
        threshold: float = 0.5,
        class_names: Sequence[str] | None = None,
        covid_class: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = _check_setup(mode, num_classes, threshold, class_names)
        self.mode = mode
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        if covid_class is not None and covid_class not in self.class_names:
            raise ValueError(
                f"covid_class={covid_class!r} is not one of the classes {list(self.class_names)}"
            )
        self.covid_class = covid_class
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(
                name, default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
            )
        # (sum of per-image dice, of per-image iou, number of images), in float64
        self.add_state(
            "image_sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "covid_sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, logits: Tensor, target: Tensor, labels: Tensor | None = None) -> None:
        """Add a batch: raw ``logits``, its ``target`` (shapes as in the class docstring) and,
        for the COVID-19 figures, the images' class ``labels`` (B)."""
        tp, fp, fn, tn = _per_image_counts(
            logits.detach(), target.detach(), self.mode, self.threshold, self.num_classes
        )
        self.tp += tp.sum(0)
        self.fp += fp.sum(0)
        self.fn += fn.sum(0)
        self.tn += tn.sum(0)
        per_class = _scores(tp, fp, fn, tn)
        figures = _image_figures(per_class, self.mode)
        self.image_sums += torch.stack(
            [figures["dice"].sum(), figures["iou"].sum(), figures["dice"].new_tensor(len(tp))]
        )
        if self.covid_class is None:
            return
        if labels is None:
            raise ValueError(
                "segmentation metrics with covid_class set need the images' class labels: "
                "update(logits, target, labels)"
            )
        covid = torch.as_tensor(labels, device=tp.device).reshape(-1) == COVID
        c = self.class_names.index(self.covid_class)
        dice, iou = per_class["dice"][:, c][covid], per_class["iou"][:, c][covid]
        self.covid_sums += torch.stack([dice.sum(), iou.sum(), dice.new_tensor(len(dice))])

    def compute(self) -> dict[str, Tensor]:
        """The figures over everything added since the last reset."""
        per_class = _scores(self.tp, self.fp, self.fn, self.tn)
        if self.mode == "binary":
            out = {k: v[0].float() for k, v in per_class.items()}
        else:
            out = {k: v[1:].mean().float() for k, v in per_class.items()}
            for c in range(1, self.num_classes):
                name = self.class_names[c]
                out[f"dice_{name}"] = per_class["dice"][c].float()
                out[f"iou_{name}"] = per_class["iou"][c].float()
        groups = [("image", self.image_sums)]
        if self.covid_class is not None:
            groups.append(("covid", self.covid_sums))
        for group, (dice, iou, count) in groups:
            # no image of the group seen: NaN (written as null), never a made-up 0 or 1
            out[f"dice_{group}"] = (dice / count if count > 0 else dice * float("nan")).float()
            out[f"iou_{group}"] = (iou / count if count > 0 else iou * float("nan")).float()
        return out


@torch.no_grad()
def per_image_scores(
    logits: Tensor,
    target: Tensor,
    mode: str = "binary",
    threshold: float = 0.5,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Scores of each image of a batch, float32 tensors of shape B.

    Keys: ``dice``, ``iou``, ``sensitivity``, ``specificity``, ``precision`` (multiclass: means
    over the foreground classes 1 .. C-1), ``pred_fraction`` and ``true_fraction`` (the share of
    the image's pixels predicted / labelled foreground; multiclass: any non-background class).
    Multiclass adds ``dice_<name>``, ``iou_<name>``, ``pred_fraction_<name>`` and
    ``true_fraction_<name>`` for each foreground class.

    Zero denominators follow the module's rule: an image with an empty truth and an empty
    prediction has dice = iou = 1 (a correct "no infection"); an empty truth with any false
    positive has dice = iou = 0.

    Args:
        logits: raw network output, B x 1 x H x W (binary) or B x C x H x W (multiclass).
        target: float B x 1 x H x W in {0, 1} (binary) or int64 B x H x W (multiclass).
        mode: ``binary`` (sigmoid > ``threshold``) or ``multiclass`` (argmax).
        threshold: probability above which a binary pixel is positive, in (0, 1).
        num_classes: number of classes; ``None`` takes it from the logits (1 in binary mode).
        class_names: names for the per-class keys; defaults as in :class:`SegmentationMetrics`.
    """
    if num_classes is None:
        num_classes = 1 if mode == "binary" else int(logits.shape[1]) if logits.dim() > 1 else 0
    names = _check_setup(mode, num_classes, threshold, class_names)
    tp, fp, fn, tn = _per_image_counts(logits, target, mode, float(threshold), num_classes)
    per_class = _scores(tp, fp, fn, tn)
    pixels = (tp + fp + fn + tn).double().clamp_min(1)
    pred_share = (tp + fp).double() / pixels
    true_share = (tp + fn).double() / pixels
    out = _image_figures(per_class, mode)
    if mode == "binary":
        out["pred_fraction"] = pred_share[:, 0]
        out["true_fraction"] = true_share[:, 0]
    else:
        out["pred_fraction"] = 1.0 - pred_share[:, 0]
        out["true_fraction"] = 1.0 - true_share[:, 0]
        for c in range(1, num_classes):
            out[f"dice_{names[c]}"] = per_class["dice"][:, c]
            out[f"iou_{names[c]}"] = per_class["iou"][:, c]
            out[f"pred_fraction_{names[c]}"] = pred_share[:, c]
            out[f"true_fraction_{names[c]}"] = true_share[:, c]
    return {k: v.float() for k, v in out.items()}


class ClassificationMetrics(MetricCollection):
    """Accuracy, macro F1, macro AUROC, COVID-19 sensitivity / specificity and calibration
    error over a split.

    A :class:`torchmetrics.MetricCollection` of ``MulticlassAccuracy`` (micro: the share of
    correct samples), ``MulticlassF1Score`` (macro), ``MulticlassAUROC`` (macro one-vs-rest, on
    the softmax probabilities), ``MulticlassCalibrationError`` (``ece``: l1, over equal-width
    bins of the top probability) and ``MulticlassConfusionMatrix``; each accumulates its own
    states and syncs them across processes. Sensitivity and specificity of the positive class
    (COVID-19 by default) come from the confusion matrix, with the module's rule for zero
    denominators (no positive sample: sensitivity 1; no negative sample: specificity 1).

    :meth:`compute` (and calling the object on a batch) returns float32 scalars under ``acc``,
    ``f1_macro``, ``auroc``, ``ece``, ``sensitivity_<positive_name>``,
    ``specificity_<positive_name>`` (``sensitivity_covid`` and ``specificity_covid`` by
    default); :meth:`confusion_matrix`
    gives the C x C counts, rows = truth, columns = prediction.

    Args:
        num_classes: number of classes (logits B x C with C = ``num_classes``).
        positive_class: index of the class whose sensitivity / specificity is reported
            (``0`` = COVID-19 in the project's class order).
        positive_name: suffix of those two keys.
        calibration_bins: the confidence bins of ``ece``.
        kwargs: passed to each torchmetrics metric (e.g. ``sync_on_compute``).
    """

    def __init__(
        self,
        num_classes: int = len(CLASSES),
        positive_class: int = 0,
        positive_name: str = "covid",
        calibration_bins: int = 15,
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 <= positive_class < num_classes:
            raise ValueError(
                f"positive_class={positive_class} is not a class index in [0, {num_classes})"
            )
        super().__init__(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", **kwargs),
                "f1_macro": MulticlassF1Score(num_classes, average="macro", **kwargs),
                "auroc": MulticlassAUROC(num_classes, average="macro", thresholds=None, **kwargs),
                "confmat": MulticlassConfusionMatrix(num_classes, **kwargs),
                "ece": MulticlassCalibrationError(
                    num_classes, n_bins=calibration_bins, norm="l1", **kwargs
                ),
            },
            compute_groups=False,
        )
        self.num_classes = int(num_classes)
        self.positive_class = int(positive_class)
        self.positive_name = str(positive_name)

    def _probabilities(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"classification logits must be B x {self.num_classes}, got {tuple(logits.shape)}"
            )
        if target.dim() != 1 or target.shape[0] != logits.shape[0] or target.is_floating_point():
            raise ValueError(
                f"classification target must be int64 of shape ({logits.shape[0]},), got "
                f"{target.dtype} {tuple(target.shape)}"
            )
        return torch.softmax(logits.detach().float(), dim=1), target.detach().long()

    def _finish(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        confusion = values.pop("confmat")
        out = {k: v.float() for k, v in values.items()}
        out.update(self._positive_rates(confusion))
        return out

    def _positive_rates(self, confusion: Tensor) -> dict[str, Tensor]:
        p = self.positive_class
        confusion = confusion.long()
        tp = confusion[p, p]
        fn = confusion[p, :].sum() - tp
        fp = confusion[:, p].sum() - tp
        tn = confusion.sum() - tp - fn - fp
        return {
            f"sensitivity_{self.positive_name}": _ratio(tp, tp + fn).float(),
            f"specificity_{self.positive_name}": _ratio(tn, tn + fp).float(),
        }

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Add a batch: raw ``logits`` B x C and int64 class indices ``target`` B."""
        probs, target = self._probabilities(logits, target)
        super().update(probs, target)

    def forward(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Add a batch and return the figures of that batch alone."""
        probs, target = self._probabilities(logits, target)
        return self._finish(super().forward(probs, target))

    def compute(self) -> dict[str, Tensor]:
        """The figures over everything added since the last reset."""
        return self._finish(super().compute())

    def confusion_matrix(self) -> Tensor:
        """C x C counts since the last reset: rows = truth, columns = prediction."""
        return self["confmat"].compute()
