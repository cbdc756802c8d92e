"""Augmentation of whole training batches on the training device, after transfer.

The albumentations path (``augment=light|strong``) augments one sample at a time in the loader
workers: on a GPU node that per-sample work, not the model, limits the step rate.
:class:`BatchAugment` (``augment=gpu_light|gpu_strong``) does the same kinds of transforms to a
whole batch at once, on the device the batch was moved to, with every sample's own random
parameters and no Python loop over samples. The DataModule applies it in Lightning's
``on_after_batch_transfer`` hook, only while training.

Geometry (flip, affine, elastic) is one resampling of one grid per sample: bilinear for the
image, nearest-neighbour for every mask, zeros outside (a black border, like albumentations'
``border_mode=0``), so masks keep exactly their values (0 / 1, or class indices) and stay
aligned with the image. Intensity transforms work on the [0, 1] gray level, between undoing and
redoing the DataModule's normalisation.

The random parameters of a batch are a function of a key (the DataModule gives its seed, the
epoch, the batch's index in the epoch and the process's rank), drawn from generators made for
that batch alone: a run resumed in the middle of an epoch draws what the uninterrupted run drew,
and DDP processes draw differently. The global RNG is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from covidqu.errors import ConfigError

#: Batch keys that hold masks: resampled with nearest-neighbour, never blended.
MASK_KEYS: tuple[str, ...] = ("mask", "lung")

Range = float | Sequence[float]


def _range(name: str, value: Range, symmetric: bool = True) -> tuple[float, float]:
    """A ``(low, high)`` range; a single number ``x`` means ``(-x, x)`` as in albumentations."""
    if isinstance(value, (int, float)):
        if not symmetric:
            return float(value), float(value)
        low, high = -abs(float(value)), abs(float(value))
    else:
        values = [float(v) for v in value]
        if len(values) != 2 or values[0] > values[1]:
            raise ConfigError(f"augment.device.{name} must be [low, high] with low <= high")
        low, high = values
    return low, high


def _probability(name: str, p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"augment.device.{name} is a probability in [0, 1], got {p}")
    return float(p)


def batch_seeds(key: Sequence[int]) -> tuple[int, int]:
    """Two independent 64-bit seeds from ``key`` (any number of integers).

    NumPy's SeedSequence mixes the integers so that neighbouring keys (batch 7 and batch 8,
    rank 0 and rank 1) give unrelated streams, which ``seed + batch`` would not.
    """
    entropy = [int(k) % 2**64 for k in key]
    first, second = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(first), int(second)


def _gaussian_taps(sigma: Tensor, radius: int, size: Tensor | None = None) -> Tensor:
    """Normalised 1-D Gaussian kernels, one row per sigma, ``2 * radius + 1`` taps; with
    ``size``, each row keeps only its central ``size`` taps (a smaller kernel, zero-padded)."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    w = torch.exp(-(t[None] ** 2) / (2.0 * sigma[:, None] ** 2))
    if size is not None:
        w = w * (t[None].abs() <= (size[:, None] // 2))
    return w / w.sum(dim=1, keepdim=True)


def _separable_blur(x: Tensor, taps: Tensor, mode: str) -> Tensor:
    """Blur each of ``n`` images (n x C x H x W) with its own 1-D kernel (n x K) along both
    axes: one grouped convolution per axis over the whole batch."""
    n, c, h, w = x.shape
    k = taps.shape[1]
    pad = k // 2
    weight = taps.repeat_interleave(c, dim=0)[:, None, None, :]  # (n * c) x 1 x 1 x K
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode=mode), weight, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode=mode), weight.transpose(2, 3), groups=n * c)
    return y.reshape(n, c, h, w)


class BatchAugment:
    """Flip, affine, elastic, brightness / contrast, gamma and blur-or-noise, per sample, for a
    whole batch on its device.

    Each transform has a probability (``*_p``; 0 turns it off) and the ranges of its
    albumentations namesake, with the same meaning: see ``conf/augment/gpu_light.yaml`` and
    ``gpu_strong.yaml`` beside ``light.yaml`` and ``strong.yaml``. The order is that of
    ``strong.yaml``: flip, affine, elastic (the three as one resampling), brightness / contrast,
    gamma, then blur or noise (one of the two, evenly).

    Args:
        flip_p: horizontal flip.
        affine_p, scale, translate_percent, rotate, shear: ``albumentations.Affine`` about the
            image centre: x and y scales drawn apart (its default ``keep_ratio=False``),
            translation as a fraction of the side per axis, rotation and x / y shear in degrees.
        elastic_p, elastic_alpha, elastic_sigma: ``albumentations.ElasticTransform``: Gaussian
            noise scaled to at most 1, smoothed with a Gaussian of ``elastic_sigma`` pixels,
            times ``elastic_alpha`` pixels.
        brightness_contrast_p, brightness_limit, contrast_limit:
            ``albumentations.RandomBrightnessContrast``: ``x * (1 + c) + b``.
        gamma_p, gamma_limit: ``albumentations.RandomGamma``: ``x ** (g / 100)``.
        blur_noise_p, blur_limit, blur_sigma, noise_std_range: ``albumentations.OneOf`` of
            ``GaussianBlur`` (odd kernel sizes in ``blur_limit``, sigma in ``blur_sigma``) and
            ``GaussNoise`` (standard deviation in ``noise_std_range``, of the full gray range).
    """

    def __init__(
        self,
        flip_p: float = 0.0,
        affine_p: float = 0.0,
        scale: Range = (1.0, 1.0),
        translate_percent: Range = 0.0,
        rotate: Range = 0.0,
        shear: Range = 0.0,
        elastic_p: float = 0.0,
        elastic_alpha: float = 1.0,
        elastic_sigma: float = 50.0,
        brightness_contrast_p: float = 0.0,
        brightness_limit: Range = 0.2,
        contrast_limit: Range = 0.2,
        gamma_p: float = 0.0,
        gamma_limit: Range = (80.0, 120.0),
        blur_noise_p: float = 0.0,
        blur_limit: Sequence[int] = (3, 7),
        blur_sigma: Range = (0.5, 3.0),
        noise_std_range: Range = (0.2, 0.44),
    ) -> None:
        self.flip_p = _probability("flip_p", flip_p)
        self.affine_p = _probability("affine_p", affine_p)
        self.scale = _range("scale", scale, symmetric=False)
        self.translate = _range("translate_percent", translate_percent)
        self.rotate = _range("rotate", rotate)
        self.shear = _range("shear", shear)
        self.elastic_p = _probability("elastic_p", elastic_p)
        self.elastic_alpha = float(elastic_alpha)
        self.elastic_sigma = float(elastic_sigma)
        self.brightness_contrast_p = _probability("brightness_contrast_p", brightness_contrast_p)
        self.brightness = _range("brightness_limit", brightness_limit)
        self.contrast = _range("contrast_limit", contrast_limit)
        self.gamma_p = _probability("gamma_p", gamma_p)
        self.gamma = _range("gamma_limit", gamma_limit, symmetric=False)
        self.blur_noise_p = _probability("blur_noise_p", blur_noise_p)
        low, high = (int(v) for v in _range("blur_limit", blur_limit, symmetric=False))
        self.blur_sizes = [k for k in range(low, high + 1) if k % 2 == 1 and k >= 3]
        self.blur_sigma = _range("blur_sigma", blur_sigma, symmetric=False)
        self.noise_std = _range("noise_std_range", noise_std_range, symmetric=False)
        if self.scale[0] <= 0:
            raise ConfigError(f"augment.device.scale must be positive, got {list(self.scale)}")
        if self.elastic_sigma <= 0:
            raise ConfigError(f"augment.device.elastic_sigma must be > 0, got {elastic_sigma}")
        if self.gamma[0] <= 0:
            raise ConfigError(f"augment.device.gamma_limit must be > 0, got {list(self.gamma)}")
        if self.blur_noise_p > 0 and not self.blur_sizes:
            raise ConfigError(
                f"augment.device.blur_limit={list(blur_limit)} holds no odd kernel size >= 3"
            )
        if self.blur_sigma[0] <= 0 or self.noise_std[0] < 0:
            raise ConfigError("augment.device.blur_sigma must be > 0 and noise_std_range >= 0")

    def __repr__(self) -> str:
        on = [n for n in ("flip", "affine", "elastic", "brightness_contrast", "gamma", "blur_noise")
              if getattr(self, f"{n}_p") > 0]  # fmt: skip
        return f"BatchAugment({', '.join(on) or 'nothing'})"

    # -- the batch -----------------------------------------------------------------------------

    def __call__(
        self, batch: Mapping[str, Any], key: Sequence[int], mean: float, std: float
    ) -> dict[str, Any]:
        """``batch`` (the batch contract of :mod:`covidqu.constants`, on any device) augmented;
        the same ``key`` gives the same result. ``mean`` / ``std``: the normalisation of
        ``batch["image"]``, kept in the result."""
        image = batch["image"]
        n, _, h, w = image.shape
        seed, device_seed = batch_seeds(key)
        gen = torch.Generator().manual_seed(seed)  # per-sample parameters, drawn on the CPU
        noise_gen = torch.Generator(device=image.device).manual_seed(device_seed)  # fields
        draw = _Draws(n, gen)

        geometry = self._geometry(draw, h, w)
        intensity = self._intensity(draw)
        touched = geometry["moved"] | intensity["touched"]
        if not touched.any():
            return dict(batch)

        out = dict(batch)
        x = image.float() * std + mean  # the [0, 1] gray level
        if geometry["moved"].any():
            x, moved_masks = self._warp(x, batch, geometry, noise_gen)
            out.update(moved_masks)
        x = self._adjust(x, intensity, noise_gen)
        x = (x - mean) / std
        keep = (~touched).to(image.device)[:, None, None, None]
        out["image"] = torch.where(keep, image.float(), x).to(image.dtype)
        return out

    # -- parameters ----------------------------------------------------------------------------

    def _geometry(self, draw: _Draws, h: int, w: int) -> dict[str, Tensor]:
        """Which samples move, and each one's affine map from output to input coordinates (in
        ``affine_grid``'s normalised units), flip included. Every parameter is drawn whether
        or not its transform is on, so that one probability does not shift the others' draws.
        """
        flip = draw.coin(self.flip_p)
        affine = draw.coin(self.affine_p)
        elastic = draw.coin(self.elastic_p)
        sx, sy = draw.uniform(*self.scale), draw.uniform(*self.scale)
        tx, ty = draw.uniform(*self.translate), draw.uniform(*self.translate)
        angle = torch.deg2rad(draw.uniform(*self.rotate))
        shx = torch.tan(torch.deg2rad(draw.uniform(*self.shear)))
        shy = torch.tan(torch.deg2rad(draw.uniform(*self.shear)))

        # The forward map in pixels about the centre: rotate . shear . scale, then translate.
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shr = torch.stack(
            [
                torch.stack([torch.ones_like(shx), shx], -1),
                torch.stack([shy, torch.ones_like(shy)], -1),
            ],
            -2,
        )
        scl = torch.diag_embed(torch.stack([sx, sy], -1))
        linear = rot @ shr @ scl
        # In normalised units (x * w / 2 pixels from the centre): conjugate by the half sides.
        half = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        linear = linear / half[None, :, None] * half[None, None, :]
        shift = torch.stack([2.0 * tx, 2.0 * ty], -1)
        eye = torch.eye(2, dtype=torch.float64).expand(draw.n, 2, 2)
        linear = torch.where(affine[:, None, None], linear, eye)
        shift = torch.where(affine[:, None], shift, torch.zeros_like(shift))
        # affine_grid maps output to input: the inverse map, then the flip of the input.
        (a, b), (c, d) = linear[:, 0].unbind(-1), linear[:, 1].unbind(-1)
        inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
        inverse = inverse / (a * d - b * c)[:, None, None]
        theta = torch.cat([inverse, -(inverse @ shift[..., None])], dim=2)
        sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
        theta[:, 0] *= sign[:, None]
        return {"moved": flip | affine | elastic, "elastic": elastic, "theta": theta.float()}

    def _intensity(self, draw: _Draws) -> dict[str, Tensor]:
        bc = draw.coin(self.brightness_contrast_p)
        alpha = 1.0 + draw.uniform(*self.contrast)
        beta = draw.uniform(*self.brightness)
        gamma = draw.coin(self.gamma_p)
        gamma_value = draw.uniform(*self.gamma) / 100.0
        one_of = draw.coin(self.blur_noise_p)
        pick_blur = draw.coin(0.5)
        sizes = torch.tensor(self.blur_sizes or [3], dtype=torch.float64)
        size = sizes[draw.integers(len(sizes))]
        sigma = draw.uniform(*self.blur_sigma)
        noise_std = draw.uniform(*self.noise_std)
        return {
            "touched": bc | gamma | one_of,
            "bc": bc,
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
            "gamma_value": gamma_value,
            "blur": one_of & pick_blur,
            "noise": one_of & ~pick_blur,
            "blur_size": size,
            "blur_sigma": sigma,
            "noise_std": noise_std,
        }

    # -- transforms ----------------------------------------------------------------------------

    def _warp(
        self,
        x: Tensor,
        batch: Mapping[str, Any],
        geo: dict[str, Tensor],
        noise_gen: torch.Generator,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Resample the image (bilinear) and every mask (nearest) on one grid per sample.

        Samples that do not move take the identity grid, which nearest-neighbour reproduces
        exactly (the caller restores their image): one batched call beats gathering the moved
        samples out and scattering them back.
        """
        device = x.device
        n, _, h, w = x.shape
        theta = geo["theta"].to(device, non_blocking=True)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        # Which samples are elastic is known on the CPU: choosing them never waits for the device.
        which = geo["elastic"].nonzero().squeeze(1)
        if which.numel():
            # The displacement d(p) is taken in the output frame, before the affine map as
            # albumentations' Affine-then-Elastic does: input = theta(p + d) = theta(p) + L d.
            which = which.to(device)
            field = self._elastic_field(which.numel(), h, w, device, noise_gen)
            linear = theta[which, :, :2]
            grid[which] = grid[which] + torch.einsum("nhwj,nij->nhwi", field, linear)

        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved: dict[str, Tensor] = {}
        kinds = [k for k in MASK_KEYS if isinstance(batch.get(k), Tensor)]
        if kinds:
            # Every mask as a float channel: nearest-neighbour copies values (0 / 1, class
            # indices) or fills zeros, so they come back exactly.
            planes = [batch[k] if batch[k].dim() == 4 else batch[k][:, None] for k in kinds]
            stack = torch.cat([p.float() for p in planes], dim=1)
            stack = F.grid_sample(
                stack, grid, mode="nearest", padding_mode="zeros", align_corners=False
            )
            start = 0
            for kind, plane in zip(kinds, planes, strict=True):
                c = plane.shape[1]
                new = stack[:, start : start + c].to(plane.dtype)
                start += c
                moved[kind] = new if batch[kind].dim() == 4 else new[:, 0]
        return x, moved

    def _elastic_field(
        self, n: int, h: int, w: int, device: torch.device, gen: torch.Generator
    ) -> Tensor:
        """n smooth random displacement fields, n x H x W x 2, in ``affine_grid`` units."""
        noise = torch.randn(n, 2, h, w, device=device, generator=gen)
        noise = noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        # OpenCV's automatic kernel size for float data (4 sigma each side), as albumentations
        # blurs; within the image, which the padding needs.
        radius = min(round(self.elastic_sigma * 4), min(h, w) - 1)
        sigma = torch.full((n,), self.elastic_sigma, device=device)
        field = _separable_blur(noise, _gaussian_taps(sigma, radius), mode="replicate")
        field = field * self.elastic_alpha
        scale = torch.tensor([2.0 / w, 2.0 / h], device=device)  # pixels -> normalised units
        return field.permute(0, 2, 3, 1) * scale

    def _adjust(self, x: Tensor, p: dict[str, Tensor], noise_gen: torch.Generator) -> Tensor:
        """Brightness / contrast, gamma, then blur or noise, each on its own samples."""
        device = x.device

        def per_sample(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=x.dtype)[:, None, None, None]

        def chosen(t: Tensor) -> Tensor:
            return t.to(device)[:, None, None, None]

        if p["bc"].any():
            new = (x * per_sample(p["alpha"]) + per_sample(p["beta"])).clamp(0.0, 1.0)
            x = torch.where(chosen(p["bc"]), new, x)
        if p["gamma"].any():
            new = x.clamp(0.0, 1.0) ** per_sample(p["gamma_value"])
            x = torch.where(chosen(p["gamma"]), new, x)
        if p["blur"].any():
            idx = p["blur"].nonzero().squeeze(1).to(device)
            radius = max(self.blur_sizes) // 2
            sigma = p["blur_sigma"].to(device=device, dtype=x.dtype)[idx]
            size = p["blur_size"].to(device=device, dtype=x.dtype)[idx]
            x = x.clone()
            x[idx] = _separable_blur(x[idx], _gaussian_taps(sigma, radius, size), mode="reflect")
        if p["noise"].any():
            noise = torch.randn(x.shape, device=device, dtype=x.dtype, generator=noise_gen)
            new = (x + noise * per_sample(p["noise_std"])).clamp(0.0, 1.0)
            x = torch.where(chosen(p["noise"]), new, x)
        return x


class _Draws:
    """Per-sample random numbers from one generator, in a fixed order."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n, self.gen = n, gen

    def coin(self, p: float) -> Tensor:
        return torch.rand(self.n, generator=self.gen, dtype=torch.float64) < p

    def uniform(self, low: float, high: float) -> Tensor:
        u = torch.rand(self.n, generator=self.gen, dtype=torch.float64)
        return low + (high - low) * u

    def integers(self, high: int) -> Tensor:
        return torch.randint(high, (self.n,), generator=self.gen)
