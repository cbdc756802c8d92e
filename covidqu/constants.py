"""Facts shared by the data and model code: the class order and the table of targets.

This is the only module that both ``covidqu.data`` and ``covidqu.models`` import: the two meet
nowhere else but in the config and in the batch contract described here.

Batch contract (one sample; the DataLoader stacks them):

``image``  float32, 1 x H x W, normalised with the DataModule's ``mean`` / ``std``.
``mask``   the task's target (see :data:`TARGETS`): float32 1 x H x W in {0, 1} for a binary
           target; int64 H x W in ``[0, num_classes)`` for a multi-class one.
``lung``   float32 1 x H x W lung mask, for severity (the infected share of the lung), whenever
           the target is something other than the lung mask itself.
``label``  int64 class index in :data:`CLASSES` order.
``id``     str, the image's file name without its extension.

A loader gives ``None`` in place of a batch whose every sample was left out (unreadable files,
``data.on_bad_file=skip``): Lightning skips such a training step, a module's validation and
test steps skip it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Class order used everywhere: the index of a name is its label.
CLASSES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
#: The label of COVID-19, the positive class of detection.
COVID = CLASSES.index("COVID-19")

#: Splits, by the short names a user types (folders are ``Train``, ``Val``, ``Test``).
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: How a network's outputs are read: one sigmoid channel, or a softmax over channels.
MODES: tuple[str, ...] = ("binary", "multiclass")

#: The masks each subset holds for every image, by subset.
SUBSET_MASKS: dict[str, tuple[str, ...]] = {
    "lung": ("lung",),
    "infection": ("lung", "infection"),
}
#: Dataset subsets, by the short names a user types.
SUBSETS: tuple[str, ...] = tuple(SUBSET_MASKS)


@dataclass(frozen=True)
class Target:
    """What a segmentation target (``data.target``) is made of and how a network predicts it.

    Attributes:
        name: the name a user types, ``data.target=<name>``.
        subset: the smallest subset that holds its masks (and the one it is read from by
            default).
        masks: the masks it is made of. One mask: a binary target, that mask. Several: a
            multi-class target whose class ``k`` (k >= 1) marks the pixels of ``masks[k - 1]``
            not covered by a later mask, and class 0 the rest (background).
        classes: names of the network's output channels (one for a binary target).
        description: a line for help texts.
        covid_class: the class that only COVID-19 images show (the infection), whose per-image
            figures are also averaged over the COVID-19 images alone (``dice_covid``); ``None``
            where every image shows every class.
    """

    name: str
    subset: str
    masks: tuple[str, ...]
    classes: tuple[str, ...]
    description: str
    covid_class: str | None = None

    @property
    def mode(self) -> str:
        """``binary`` (one sigmoid channel) or ``multiclass`` (softmax over channels)."""
        return "binary" if len(self.classes) == 1 else "multiclass"

    @property
    def num_classes(self) -> int:
        """Output channels of a network for this target."""
        return len(self.classes)


#: Every segmentation target a DataModule can serve as ``mask``, by name.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("lung", "lung", ("lung",), ("lung",), "binary lung mask"),
        Target(
            "infection",
            "infection",
            ("infection",),
            ("infection",),
            "binary infection mask",
            covid_class="infection",
        ),
        Target(
            "infection_multiclass",
            "infection",
            ("lung", "infection"),
            ("background", "lung", "infection"),
            "background / lung / infection, one class per pixel",
            covid_class="infection",
        ),
    )
}


def target_info(name: str) -> Target:
    """The :class:`Target` called ``name``; an error naming ``data.target`` and the choices."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"data.target={name!r} is not a known target; choose one of {tuple(TARGETS)}"
        ) from None


def subset_targets(subset: str) -> tuple[str, ...]:
    """The targets whose masks ``subset`` holds, the subset's own targets first."""
    masks = set(SUBSET_MASKS[subset])
    served = [t for t in TARGETS.values() if set(t.masks) <= masks]
    return tuple(t.name for t in sorted(served, key=lambda t: t.subset != subset))
