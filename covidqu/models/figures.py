"""Pictures of predictions: overlays of masks on a CXR, and captioned classifications.

The modules render their own overlays with these (test overlays, W&B media, ``predict``), so
a task's pictures live with the task and the pipeline only writes the files.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from covidqu.constants import CLASSES

#: Overlay colours (BGR) of mask values 1, 2, ...: lung green, infection red.
COLOURS = {1: (60, 200, 60), 2: (40, 40, 230)}


def denormalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A normalised gray image back to uint8."""
    return np.clip((x * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A BGR picture of ``image`` with each mask value tinted and outlined in its colour."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    out = bgr.astype(np.float32)
    for value, colour in COLOURS.items():
        region = mask == value
        if region.any():
            out[region] = (1 - alpha) * out[region] + alpha * np.array(colour, np.float32)
    out = out.astype(np.uint8)
    for value, colour in COLOURS.items():
        region = (mask == value).astype(np.uint8)
        if region.any():
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, 1)
    return out


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` under a black bar with ``text`` written in it."""
    h, w = panel.shape[:2]
    bar = np.zeros((max(14, h // 12), w, 3), np.uint8)
    scale = max(0.3, bar.shape[0] / 30)
    cv2.putText(
        bar,
        text,
        (3, bar.shape[0] - 4),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    return np.vstack([bar, panel])


#: Overlays of small model inputs are enlarged to at least this side, to stay readable.
MIN_PANEL_SIDE = 256


def _enlarge(image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
    k = max(1, -(-MIN_PANEL_SIDE // max(image.shape[:2])))
    if k == 1:
        return (image, *masks)
    size = (image.shape[1] * k, image.shape[0] * k)
    big = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return (
        big,
        *(cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for m in masks),
    )


def segmentation_panel(image: np.ndarray, target: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Image | ground truth | prediction, side by side, each captioned."""
    image, target, prediction = _enlarge(image, target, prediction)
    gray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    panels = [
        caption(gray, "image"),
        caption(tint(image, target), "truth"),
        caption(tint(image, prediction), "prediction"),
    ]
    return np.hstack(panels)


def classification_panel(
    image: np.ndarray, label: int | None, prediction: int, probabilities: Sequence[float]
) -> np.ndarray:
    """The image captioned with the predicted class (and the truth, when known)."""
    (image,) = _enlarge(image)
    gray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    text = f"pred {CLASSES[prediction]} {probabilities[prediction]:.2f}"
    if label is not None:
        text = f"true {CLASSES[label]} | {text}"
    return caption(gray, text)
