"""One synthetic chest X-ray: a CXR-like picture and its lung and infection masks, drawn from a
seed (see :mod:`covidqu.data.synth` for what each class shows and for the tree they fill).

Every image is a pure function of ``(seed, class, number, size)``: the same arguments give the
same pixels.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np

from covidqu.constants import CLASSES

DEFAULT_SIZE = 256
MIN_SIZE = 16
MAX_SIZE = 4096


class SyntheticCXR(NamedTuple):
    """One synthetic sample: 8-bit image and 8-bit {0, 255} lung and infection masks."""

    image: np.ndarray
    lung_mask: np.ndarray
    infection_mask: np.ndarray


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; a ValueError naming ``name`` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


# --------------------------------------------------------------------------- drawing helpers
#
# Coordinates are fractions of the image side (x to the right, y down), so every shape keeps
# its proportions at any size. The picture is drawn at no more than WORK_SIZE pixels and
# resized: smooth fields lose nothing, and masks come from thresholding resized level fields
# (positive inside), so their edges stay smooth and match the picture at any size. Fields are
# float32 brightness; random draws are turned into Python floats so they never widen an array
# to float64.

WORK_SIZE = 128
#: Opacity (relative to its peak in the lung) above which a COVID-19 lung pixel is infected.
INFECTION_THRESHOLD = 0.45


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)`` as fractions of the side, read-only."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(axis, axis, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _soft(level: np.ndarray, width: float) -> np.ndarray:
    """0 outside, 1 inside a level field (positive inside), with a rim ``width`` wide."""
    return _smoothstep(level / width + 0.5)


def _ellipse_level(
    size: int, cy: float, cx: float, ry: float, rx: float, squareness: bool = False
) -> np.ndarray:
    """Level field of an ellipse (or a squarer superellipse), about in image fractions."""
    y, x = _grid(size)
    u, v = ((x - cx) / rx) ** 2, ((y - cy) / ry) ** 2
    r = np.sqrt(np.sqrt(u * u + v * v)) if squareness else np.sqrt(u + v)
    return (1.0 - r) * min(rx, ry)


def _gauss(d: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-((d / width) ** 2))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [0, 1]: ``cells`` x ``cells`` random values, upsampled."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blur(field: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return field
    return cv2.GaussianBlur(field, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REPLICATE)


def _resize(field: np.ndarray, size: int, smooth: bool = True) -> np.ndarray:
    if field.shape[0] == size:
        return field
    interpolation = cv2.INTER_CUBIC if smooth else cv2.INTER_LINEAR
    return cv2.resize(field, (size, size), interpolation=interpolation)


# --------------------------------------------------------------------------- anatomy


class _Chest(NamedTuple):
    """One chest at working size: its picture so far and where its lungs are."""

    density: np.ndarray  # brightness, float32
    lung_level: np.ndarray  # > 0 inside the lung fields
    lung: np.ndarray  # lung_level > 0, bool
    lung_soft: np.ndarray  # lung fields with a soft rim, float32
    centres: tuple[tuple[float, float], ...]  # (cy, cx) of the lung on the image's left, right
    radii: tuple[tuple[float, float], ...]  # (ry, rx) of each lung


def _body(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Trunk, shoulders and neck: the silhouette (soft) and the trunk's level field."""
    half_width = _u(rng, 0.42, 0.47)
    trunk = _ellipse_level(size, _u(rng, 0.6, 0.66), 0.5, 0.56, half_width, squareness=True)
    shoulders = _ellipse_level(size, _u(rng, 0.19, 0.23), 0.5, 0.12, half_width + 0.03)
    neck = _ellipse_level(size, 0.0, 0.5, 0.25, _u(rng, 0.08, 0.11))
    body = _soft(np.maximum(np.maximum(trunk, shoulders), neck), 0.03)
    return body, trunk


def _lung_level(rng: np.random.Generator, size: int, side: int) -> tuple[np.ndarray, tuple, tuple]:
    """One lung: a tapered, wobbly ellipse cut from below by the dome of the diaphragm.

    ``side`` is -1 for the lung on the image's left (the patient's right), +1 for the other.
    """
    y, x = _grid(size)
    cx = 0.5 + side * _u(rng, 0.19, 0.225)
    cy = _u(rng, 0.42, 0.48)
    rx = _u(rng, 0.13, 0.165)
    ry = _u(rng, 0.25, 0.3)

    dy = (y - cy) / ry
    taper = _u(rng, 0.2, 0.35)  # narrow apex, broad base
    dx = (x - cx) / (rx * (1.0 + taper * np.clip(dy, -1.2, 1.2)))
    r = np.sqrt(dx * dx + dy * dy)
    # Boundary radius 1 + sum_k a_k cos(k theta + phi_k), from powers of the unit vector.
    unit = (dx + 1j * dy).astype(np.complex64) / np.maximum(r, 1e-6)
    power, wobble = unit, np.zeros_like(r)
    for _ in range(3):
        power = power * unit
        coef = _u(rng, 0.0, 0.05) * np.exp(1j * _u(rng, 0, 2 * np.pi))
        wobble += (complex(coef) * power).real
    ellipse = (1.0 + wobble - r) * rx

    dome_centre = cx - side * rx * _u(rng, 0.0, 0.4)
    dome_top = cy + ry * _u(rng, 0.6, 0.8)
    dome_height = ry * _u(rng, 0.15, 0.3)
    diaphragm = dome_top + dome_height * ((x - dome_centre) / (1.6 * rx)) ** 2 - y
    return np.minimum(ellipse, diaphragm), (cy, cx), (ry, rx)


def _heart(rng: np.random.Generator, size: int) -> np.ndarray:
    """Level field of the heart shadow, which bulges into the lung on the image's right."""
    cy, cx = _u(rng, 0.62, 0.68), 0.5 + _u(rng, 0.03, 0.07)
    return _ellipse_level(size, cy, cx, _u(rng, 0.1, 0.13), _u(rng, 0.13, 0.17))


def _spine_and_mediastinum(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertebral column with vertebrae, a wider upper mediastinum and a dark trachea."""
    y, x = _grid(size)
    col, row = x[0], y[:, 0]  # separable: a column profile times a row profile
    mid = 0.5 + _u(rng, -0.01, 0.01)
    spine = _gauss(col - mid, _u(rng, 0.028, 0.036))
    vertebrae = 0.8 + 0.2 * np.cos((2 * np.pi / _u(rng, 0.045, 0.06)) * row)
    mediastinum = _gauss(col - mid, _u(rng, 0.07, 0.09))
    upper = 0.4 + 0.6 * _smoothstep((0.55 - row) / 0.2)
    trachea = _gauss(col - mid, 0.013)
    above_carina = _smoothstep((_u(rng, 0.3, 0.36) - row) / 0.05)
    return (
        0.12 * np.outer(vertebrae, spine)
        + 0.2 * np.outer(upper, mediastinum)
        - 0.1 * np.outer(above_carina, trachea)
    )


def _clavicles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two bright bars from the top of the sternum out towards the shoulders."""
    y, x = _grid(size)
    out = np.zeros((size, size), np.float32)
    for side in (-1, 1):
        x0, y0 = 0.5 + side * 0.05, _u(rng, 0.2, 0.24)
        x1, y1 = 0.5 + side * _u(rng, 0.34, 0.4), _u(rng, 0.12, 0.16)
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        ex, ey = x - x0 - t * vx, y - y0 - t * vy
        out += np.exp(-(ex * ex + ey * ey) / 0.013**2)
    return 0.12 * out


def _ribs(
    rng: np.random.Generator, size: int, body: np.ndarray, lung_soft: np.ndarray
) -> np.ndarray:
    """Curved bands across the chest (posterior ribs), seen mostly through the lungs."""
    y, x = _grid(size)
    d = np.abs(x - 0.5)
    curve = _u(rng, 1.2, 1.8) * d * d - _u(rng, 0.1, 0.2) * d
    phase = (y - curve) * (2 * np.pi / _u(rng, 0.06, 0.075)) + _u(rng, 0, 2 * np.pi)
    bands = np.maximum(np.cos(phase), 0.0) ** 2
    cage = _smoothstep((d - 0.03) / 0.05) * _smoothstep((0.78 - y) / 0.1) * body
    return _u(rng, 0.05, 0.08) * bands * cage * (0.3 + 0.7 * lung_soft)


def _lung_markings(
    rng: np.random.Generator, size: int, centres: tuple, radii: tuple, lung_soft: np.ndarray
) -> np.ndarray:
    """Vessel shadows fanning out from each hilum, fading towards the periphery."""
    y, x = _grid(size)
    out = np.zeros((size, size), np.float32)
    wiggle = _smooth_noise(rng, size, 6) * 5.0
    for (cy, cx), (_, rx) in zip(centres, radii, strict=True):
        hx, hy = cx + (0.5 - cx) * 0.6, cy + 0.04
        dist = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
        fan = 0.5 + 0.5 * np.cos(int(rng.integers(14, 22)) * np.arctan2(y - hy, x - hx) + wiggle)
        fan = fan * fan
        out += fan * fan * np.exp(dist * (-1.0 / rx)) + 0.5 * _gauss(dist, 0.4 * rx)
    return 0.06 * out * lung_soft


def _chest(rng: np.random.Generator, size: int) -> _Chest:
    """Draw the anatomy shared by every class."""
    y, x = _grid(size)
    body, trunk = _body(rng, size)
    heart = _heart(rng, size)
    left, c_left, r_left = _lung_level(rng, size, -1)
    right, c_right, r_right = _lung_level(rng, size, 1)
    mediastinum = np.abs(x - 0.5) - 0.035
    lung_level = np.minimum(np.maximum(left, right), np.minimum(-heart, mediastinum))
    lung_level = np.minimum(lung_level, trunk - 0.02)
    lung_soft = _soft(lung_level, 0.012)
    centres, radii = (c_left, c_right), (r_left, r_right)

    background = _u(rng, 0.04, 0.12)
    tissue = _u(rng, 0.5, 0.6) + 0.12 * y
    density = background + (tissue - background) * body
    density -= _u(rng, 0.28, 0.36) * lung_soft * (1.0 - 0.35 * y)
    density += _u(rng, 0.1, 0.16) * _soft(heart, 0.06)
    density += _spine_and_mediastinum(rng, size) * body
    density += _clavicles(rng, size) + _ribs(rng, size, body, lung_soft)
    density += _lung_markings(rng, size, centres, radii, lung_soft)
    return _Chest(density, lung_level, lung_level > 0, lung_soft, centres, radii)


# --------------------------------------------------------------------------- opacities


def _covid_opacity(rng: np.random.Generator, size: int, chest: _Chest) -> np.ndarray:
    """Patchy ground-glass opacities, mostly peripheral and lower, scaled to peak at 1 in the lung.

    The blob sizes follow a target infected share of the lung between about 5% and 50%.
    """
    y, x = _grid(size)
    ys, xs = np.nonzero(chest.lung)
    py, px = (ys + 0.5) / size, (xs + 0.5) / size
    lateral = np.abs(px - 0.5)
    lower = (py - py.min()) / max(float(py.max() - py.min()), 1e-6)
    weight = (lateral / lateral.max()) ** 2 + lower**2 + 0.1
    weight /= weight.sum()

    count = int(rng.integers(2, 6))
    share = _u(rng, 0.04, 0.4)
    sigma = math.sqrt(share * ys.size / size**2 / (count * math.pi * 0.8))
    field = np.zeros((size, size), np.float32)
    for i in rng.choice(ys.size, size=count, p=weight):
        s = sigma * _u(rng, 0.8, 1.25)
        stretch = _u(rng, 0.7, 1.4)
        ex, ey = (x - float(px[i])) / (s * stretch), (y - float(py[i])) * (stretch / s)
        field += _u(rng, 0.75, 1.0) * np.exp(-0.5 * (ex * ex + ey * ey))
    field *= 0.5 + 0.5 * _smooth_noise(rng, size, max(4, size // 16))
    return field / max(float(field[chest.lung].max()), 1e-6)


def _consolidation(rng: np.random.Generator, size: int, chest: _Chest) -> np.ndarray:
    """One dense, homogeneous lobar consolidation with a sharp fissure border."""
    y, x = _grid(size)
    side = int(rng.integers(0, 2))
    (cy, cx), (ry, _) = chest.centres[side], chest.radii[side]
    fissure = cy + ry * _u(rng, -0.3, 0.3) + _u(rng, -0.6, 0.6) * (x - cx) - y
    lobe = fissure if rng.random() < 0.5 else -fissure - 0.2 * ry  # upper or lower lobe
    same_side = (x - 0.5) * (2 * side - 1)
    region = _soft(np.minimum(np.minimum(lobe, same_side), chest.lung_level), 0.015)
    bronchograms = 0.8 + 0.2 * _smooth_noise(rng, size, max(4, size // 8))
    return _u(rng, 1.0, 1.3) * region * bronchograms


def _nodules(rng: np.random.Generator, size: int, chest: _Chest) -> np.ndarray:
    """Many small, round, bright nodules scattered through both lungs."""
    ys, xs = np.nonzero(chest.lung)
    dots = np.zeros((size, size), np.float32)
    count = int(rng.integers(30, 70))
    pick = rng.choice(ys.size, size=count)
    dots[ys[pick], xs[pick]] = rng.uniform(0.7, 1.0, count).astype(np.float32)
    sigma = max(0.7, _u(rng, 0.006, 0.011) * size)
    dots = _blur(dots, sigma) * (2.0 * np.pi * sigma * sigma)
    return 1.3 * np.minimum(dots, 1.0) * chest.lung_soft


def _reticular(rng: np.random.Generator, size: int, chest: _Chest) -> np.ndarray:
    """A fine net of lines (interstitial pattern): zero crossings of smooth random fields."""
    cells = max(6, int(_u(rng, 0.16, 0.2) * size))
    net = np.zeros((size, size), np.float32)
    for _ in range(2):
        net = np.maximum(net, _gauss(_smooth_noise(rng, size, cells) - 0.5, 0.04))
    extent = 0.4 + 0.6 * _smooth_noise(rng, size, 3)
    return net * extent * chest.lung_soft


def _non_covid_opacity(rng: np.random.Generator, size: int, chest: _Chest) -> np.ndarray:
    """Consolidation, nodules or a reticular net, one of them, at random."""
    pattern = (_consolidation, _nodules, _reticular)[int(rng.integers(0, 3))]
    return pattern(rng, size, chest)


# --------------------------------------------------------------------------- one image


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Detector and exposure: blur, brightness / contrast / gamma jitter, noise; to uint8."""
    size = density.shape[0]
    image = _blur(density, _u(rng, 0.3, 0.8) * size / 256)
    image = (image - 0.45) * _u(rng, 0.85, 1.2) + (0.45 + _u(rng, -0.06, 0.06))
    image = np.clip(image, 0.0, 1.0) ** _u(rng, 0.8, 1.25)
    image += _u(rng, 0.008, 0.025) * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def synthesize(cls: str, n: int, size: int = DEFAULT_SIZE, seed: int = 0) -> SyntheticCXR:
    """Draw image number ``n`` of class ``cls``: the same arguments always give the same pixels."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    size = check_int("--size", size, MIN_SIZE, MAX_SIZE)
    seed = check_int("--seed", seed, 0)
    n = check_int("n", n, 0)
    rng = np.random.default_rng([seed, CLASSES.index(cls), n])
    work = min(size, WORK_SIZE)

    chest = _chest(rng, work)
    density, opacity = chest.density, None
    if cls == "COVID-19":
        opacity = _covid_opacity(rng, work, chest)
        density = density + _u(rng, 0.25, 0.35) * opacity * chest.lung_soft
    elif cls == "Non-COVID":
        density = density + _u(rng, 0.2, 0.3) * _non_covid_opacity(rng, work, chest)

    lung = _resize(chest.lung_level, size, smooth=False) > 0
    infection = np.zeros_like(lung)
    if opacity is not None:
        opacity = _resize(opacity, size, smooth=False)
        peak = float(opacity[lung].max())  # never empty: keep the strongest spot at least
        infection = lung & (opacity >= min(INFECTION_THRESHOLD, peak))
    return SyntheticCXR(
        image=_expose(rng, _resize(density, size)),
        lung_mask=lung.astype(np.uint8) * 255,
        infection_mask=infection.astype(np.uint8) * 255,
    )
