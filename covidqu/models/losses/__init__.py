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

# The configs (and the recipe inside every checkpoint) name the losses as
# covidqu.models.losses.<Name>: this package keeps those names.
from covidqu.models.losses.combined import WeightedSum
from covidqu.models.losses.overlap import DiceLoss, JaccardLoss, LovaszLoss, TverskyLoss
from covidqu.models.losses.pixel import BCELoss, CrossEntropyLoss, FocalLoss

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
