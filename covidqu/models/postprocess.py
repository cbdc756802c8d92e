"""Post-processing of predicted masks: what is known of lungs and infections, applied after the
network, and chosen on the validation split.

Four steps (``postprocess=`` in the configs), each off by a zero or false value:

- ``lung_components``: keep the N largest connected components of the lung (2: the two lungs;
  stray islands in the shoulders or the abdomen go);
- ``fill_holes``: fill holes inside the lung (an opacity the network missed is lung too);
- ``inside_lung``: infection only inside the lung (the lung predicted by the same or the lung
  model, or the true lung where a split is scored);
- ``min_infection_area``: drop infection components smaller than this share of the image.

``postprocess=auto`` decides after training, as nnU-Net does: each step is tried on the
validation split, in the order above, and kept only where it raises the mean per-image Dice
(:func:`choose`). The choice travels in the checkpoint (its recipe's ``postprocess``), so
``eval``, ``predict``, ``analyze`` and ``export`` apply the same steps (``postprocess=checkpoint``,
their default). Components and holes come from :mod:`scipy.ndimage`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage

#: 8-connectivity: pixels touching at a corner are one component.
_CONNECTED = np.ones((3, 3), dtype=bool)
#: The modes of the ``postprocess`` config group.
MODES = ("fixed", "auto", "checkpoint")


@dataclass(frozen=True)
class PostProcess:
    """The post-processing steps applied to a mask (all off by default)."""

    lung_components: int = 0
    fill_holes: bool = False
    inside_lung: bool = False
    min_infection_area: float = 0.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> PostProcess:
        """The steps of a ``postprocess`` config or a recipe's record (unknown keys, such as
        ``mode``, are not steps)."""
        node = node or {}
        names = {f.name for f in fields(cls)}
        steps = cls(**{k: v for k, v in dict(node).items() if k in names})
        steps.check()
        return steps

    def check(self) -> None:
        if int(self.lung_components) < 0:
            raise ValueError(
                f"postprocess.lung_components must be >= 0 (0: off), got {self.lung_components}"
            )
        if not 0 <= float(self.min_infection_area) < 1:
            raise ValueError(
                "postprocess.min_infection_area is a share of the image in [0, 1) (0: off), got "
                f"{self.min_infection_area}"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps(self) -> list[str]:
        """The names of the steps that are on."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @property
    def active(self) -> bool:
        return bool(self.steps())

    def describe(self) -> str:
        on = [f"{k}={getattr(self, k)}" for k in self.steps()]
        return ", ".join(on) or "none"

    # -- the steps -------------------------------------------------------------------------------

    def lung(self, region: np.ndarray) -> np.ndarray:
        """A boolean lung ``region`` after the lung steps."""
        region = np.asarray(region, dtype=bool)
        if self.lung_components:
            region = largest_components(region, int(self.lung_components))
        if self.fill_holes:
            region = ndimage.binary_fill_holes(region)
        return region

    def infection(self, region: np.ndarray, lung: np.ndarray | None) -> np.ndarray:
        """A boolean infection ``region`` after the infection steps; ``lung``: the lung it must
        lie in (``None``: unknown, ``inside_lung`` is then skipped)."""
        region = np.asarray(region, dtype=bool)
        if self.inside_lung and lung is not None:
            region = region & np.asarray(lung, dtype=bool)
        if self.min_infection_area:
            region = drop_small(region, float(self.min_infection_area) * region.size)
        return region

    def clean(
        self, mask: np.ndarray, classes: Sequence[str], lung: np.ndarray | None = None
    ) -> np.ndarray:
        """A predicted label ``mask`` (0/1 for one class, class indices for several, named by
        ``classes``) after the steps that concern its classes; ``lung``: the lung an infection
        must lie in where the mask has none (a binary infection mask)."""
        if not self.active:
            return mask
        if len(classes) == 1:
            region = mask > 0
            if classes[0] == "lung":
                region = self.lung(region)
            elif classes[0] == "infection":
                region = self.infection(region, lung)
            return region.astype(mask.dtype)
        if not {"lung", "infection"} <= set(classes):
            return mask
        lung_index, infection_index = classes.index("lung"), classes.index("infection")
        lung_region = self.lung(mask >= lung_index)
        infected = self.infection(mask == infection_index, lung_region)
        out = np.where(lung_region, lung_index, 0)
        return np.where(infected, infection_index, out).astype(mask.dtype)


def largest_components(region: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` largest 8-connected components of ``region``."""
    labels, count = ndimage.label(region, structure=_CONNECTED)
    if count <= keep:
        return region
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.argsort(sizes, kind="stable")[::-1][:keep] + 1
    return np.isin(labels, kept)


def drop_small(region: np.ndarray, min_pixels: float) -> np.ndarray:
    """``region`` without its 8-connected components of fewer than ``min_pixels`` pixels."""
    labels, count = ndimage.label(region, structure=_CONNECTED)
    if count == 0:
        return region
    sizes = np.bincount(labels.ravel())
    small = sizes < min_pixels
    small[0] = True  # the background stays background
    return ~small[labels]


# -- choosing on the validation split -------------------------------------------------------------


def relevant(classes: Sequence[str], candidate: PostProcess) -> list[str]:
    """The steps of ``candidate`` (those on) that change a mask of ``classes``."""
    lung = {"lung_components", "fill_holes"}
    infection = {"inside_lung", "min_infection_area"}
    wanted: set[str] = set()
    if "lung" in classes:
        wanted |= lung
    if "infection" in classes:
        wanted |= infection
    return [s for s in candidate.steps() if s in wanted]


def trials(classes: Sequence[str], candidate: PostProcess) -> dict[str, PostProcess]:
    """Every combination of ``candidate``'s relevant steps, keyed ``"a+b"`` (``""``: none)."""
    steps = relevant(classes, candidate)
    off = PostProcess()
    out = {}
    for n in range(len(steps) + 1):
        for combo in itertools.combinations(steps, n):
            on = {s: getattr(candidate, s) for s in combo}
            out["+".join(combo)] = replace(off, **on)
    return out


def key_of(steps: Iterable[str]) -> str:
    return "+".join(steps)


@dataclass
class Choice:
    """What :func:`choose` decided, and the figures behind it."""

    chosen: PostProcess
    #: The mean per-image Dice without any step, and with the steps chosen.
    raw: float
    post: float
    #: One entry per step tried: its name, the figure without and with it, whether kept.
    tried: list[dict[str, Any]]
    images: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.as_dict(),
            "figure": "mean per-image Dice on the validation split",
            "images": self.images,
            "dice_raw": self.raw,
            "dice_post": self.post,
            "tried": self.tried,
        }


def choose(
    classes: Sequence[str], candidate: PostProcess, rows: Sequence[Mapping[str, float]]
) -> Choice:
    """The steps of ``candidate`` to keep: tried one at a time in their order on top of those
    already kept, each kept only where the mean of ``rows[key]`` (each image's Dice under the
    trial ``key`` of :func:`trials`) rises. ``rows``: one mapping per validation image."""
    steps = relevant(classes, candidate)

    def mean(kept: Sequence[str]) -> float:
        key = key_of(s for s in steps if s in kept)
        return float(np.mean([row[key] for row in rows])) if rows else 0.0

    kept: list[str] = []
    tried = []
    for step in steps:
        before, after = mean(kept), mean([*kept, step])
        keep = after > before
        tried.append({"step": step, "without": before, "with": after, "kept": keep})
        if keep:
            kept.append(step)
    chosen = replace(PostProcess(), **{s: getattr(candidate, s) for s in kept})
    return Choice(chosen, mean([]), mean(kept), tried, len(rows))


def post_figures(
    split: str, rows: Sequence[Mapping[str, Any]], covid_class: str | None
) -> dict[str, float]:
    """``<split>/dice_image_post`` and ``iou_image_post`` (means over the images of rows scored
    after post-processing), with ``dice_covid_post`` and ``iou_covid_post`` over the COVID-19
    images for infection targets."""
    out: dict[str, float] = {}
    if not rows or "dice" not in rows[0]:
        return out
    out[f"{split}/dice_image_post"] = float(np.mean([r["dice"] for r in rows]))
    out[f"{split}/iou_image_post"] = float(np.mean([r["iou"] for r in rows]))
    if covid_class:
        covid = [r for r in rows if r.get("class") == "COVID-19"]
        if covid:
            out[f"{split}/dice_covid_post"] = float(np.mean([r["dice"] for r in covid]))
            out[f"{split}/iou_covid_post"] = float(np.mean([r["iou"] for r in covid]))
    return out


def apply_config(module: Any, node: Mapping[str, Any] | None) -> None:
    """Set a command's ``postprocess=`` on a segmentation ``module``: ``checkpoint`` keeps what
    its checkpoint records, ``none``, ``all`` (mode ``fixed``) replace it."""
    if not hasattr(module, "postprocess") or not node:
        return
    mode = node.get("mode", "checkpoint")
    if mode not in ("checkpoint", "fixed"):
        from covidqu.errors import ConfigError

        raise ConfigError(
            f"postprocess={mode} is chosen on the validation split when training: here, use "
            "postprocess=checkpoint (what the checkpoint records), postprocess=none or "
            "postprocess=all"
        )
    if mode == "fixed":
        module.postprocess = PostProcess.from_config(node)
