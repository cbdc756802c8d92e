"""Facts shared by the data and model code.

This is the only module that both ``covidqu.data`` and ``covidqu.models`` import: the two meet
nowhere else but in the config and in the batch contract described here.

Batch contract (one sample; the DataLoader stacks them):

``image``  float32, 1 x H x W, normalised with the DataModule's ``mean`` / ``std``.
``mask``   the task's target: float32 1 x H x W in {0, 1} for a binary target (``lung``,
           ``infection``); int64 H x W in {0, 1, 2} for ``infection_multiclass``
           (background / lung / infection).
``lung``   float32 1 x H x W lung mask; infection subset only, for severity (infected share).
``label``  int64 class index in :data:`CLASSES` order.
``id``     str, the image's file name without its extension.
"""

from __future__ import annotations

#: Class order used everywhere: the index of a name is its label.
CLASSES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
COVID, NON_COVID, NORMAL = 0, 1, 2
NUM_CLASSES = len(CLASSES)

#: Dataset subsets, by the short names a user types.
SUBSETS: tuple[str, ...] = ("lung", "infection")
#: Splits, by the short names a user types (folders are ``Train``, ``Val``, ``Test``).
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Segmentation targets a DataModule can serve as ``mask``.
TARGETS: tuple[str, ...] = ("lung", "infection", "infection_multiclass")
