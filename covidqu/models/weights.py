"""Encoder and classifier weights: named (downloaded by smp / timm) or a local file.

``encoder.weights`` is ``null`` (random init; also ``"none"``, ``""``), a name (``imagenet``, a
timm tag), downloaded by smp / timm, where a failed download raises
:class:`WeightsUnavailableError` and never falls back to random weights, or a local file.

A weights file is a state dict, plain or under ``"state_dict"`` / ``"model"``, read as timm reads
it and always with ``weights_only=True``: a file holding other Python objects is refused with a
:class:`~covidqu.errors.CheckpointError`, since unpickling them could run code.
timm models (classifiers, ``tu-`` encoders) load it through timm's own ``pretrained_cfg_overlay=
dict(file=...)``, which adapts the first convolution to the input channels, resamples ViT
position embeddings and drops a head made for another number of classes. smp's native encoders
can only download, so we load the file into them: wrapper prefixes (``module.``, ``model.``,
``encoder.``, ``net.``, ...) are stripped, modules the encoder lacks (a head, a decoder) ignored,
the first convolution adapted as timm does. Either way every weight but the head must be in the
file and nothing of the model's own modules left over (a resnet34 file does not initialise a
resnet18), else a ValueError names the file and the keys.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import getproxies

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hf_constants
from timm.models import adapt_input_conv, load_state_dict
from torch import nn

from covidqu.errors import ConfigError, MissingFileError, UserError
from covidqu.models.checkpoint import refused_as_unsafe, unsafe_file_error

#: The config key through which every config passes the weights.
WEIGHTS_KEY = "encoder.weights"


_FIX = f"{WEIGHTS_KEY}=null (random init) or {WEIGHTS_KEY}=/path/to/state_dict.pth (a local file)"


#: How to turn a trusted weights file that holds Python objects into one that loads safely.
_RESAVE_WEIGHTS = "Save the weights alone instead: torch.save(net.state_dict(), path)."


_NO_WEIGHTS = frozenset({"", "none", "null"})


_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


#: Leading key prefixes that wrappers add (DataParallel, torch.compile, Lightning, smp, timm).
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "net.", "backbone.")


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights were asked for by name but could not be downloaded.

    Raised instead of silently starting from random weights. The message names the two ways out:
    ``encoder.weights=null`` (random initialisation) and ``encoder.weights=/path/to/file.pth``.
    """


def parse_weights(weights: Any) -> tuple[str, Any]:
    """``("none", None)``, ``("named", str)`` or ``("file", Path)``; a file must exist."""
    if weights is None or weights is False:
        return "none", None
    if weights is True:
        return "named", "imagenet"
    if not isinstance(weights, str | os.PathLike):
        raise ConfigError(f"{WEIGHTS_KEY} must be null, a weight name or a path; got {weights!r}.")
    text = os.fspath(weights).strip()
    path = Path(text).expanduser()
    if isinstance(weights, str) and not path.is_file():
        if text.lower() in _NO_WEIGHTS:
            return "none", None
        if not any(c in text for c in "/\\~") and not text.lower().endswith(_WEIGHT_FILE_SUFFIXES):
            return "named", text
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise MissingFileError(
            f"{WEIGHTS_KEY}={path}: the weights file {state}. Point {WEIGHTS_KEY} at a state dict "
            f"file (.pth, .pt, .bin, .ckpt or .safetensors), or use {WEIGHTS_KEY}=imagenet "
            f"(download) or {WEIGHTS_KEY}=null (random init)."
        )
    return "file", path


def smp_weights(encoder_name: str, weights: str) -> tuple[str, str | bool]:
    """Encoder name and the ``encoder_weights`` argument smp wants for named weights."""
    if encoder_name.startswith("tu-"):
        return "tu-" + timm_pretrained_name(encoder_name[3:], weights), True
    try:
        settings = smp.encoders.encoders[encoder_name]["pretrained_settings"]
    except KeyError:  # timm- names that smp converts to tu- itself
        return encoder_name, True
    if weights not in settings:
        raise ConfigError(
            f"{WEIGHTS_KEY}={weights}: encoder '{encoder_name}' has no such pretrained weights. "
            f"Available: {', '.join(settings) or 'none'}; or {_FIX}."
        )
    return encoder_name, weights


def timm_pretrained_name(timm_name: str, weights: str) -> str:
    """The timm name to create with ``pretrained=True`` for ``imagenet`` or a pretrained tag."""
    base, _, tag = timm_name.partition(".")
    if weights.lower() != "imagenet":
        if tag and tag != weights:
            raise ConfigError(
                f"{WEIGHTS_KEY}={weights} conflicts with the pretrained tag in '{timm_name}'; "
                f"use {WEIGHTS_KEY}=imagenet to take the tag from the name."
            )
        tag = weights
    full = f"{base}.{tag}" if tag else base
    if tag and full not in timm.list_pretrained(full):
        tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*"))
        raise ConfigError(
            f"{WEIGHTS_KEY}={weights}: timm model '{base}' has no pretrained weights '{tag}'. "
            f"Available tags: {tags or 'none'}; or {WEIGHTS_KEY}=imagenet (the default), {_FIX}."
        )
    if not tag and not timm.models.is_model_pretrained(base):
        raise ConfigError(
            f"{WEIGHTS_KEY}=imagenet: '{base}' has no pretrained weights. Use {_FIX}."
        )
    return full


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub, where smp and timm download named weights, answers.

    Behind a proxy the Hub is reached through it, which a direct probe would miss: assume yes.
    """
    if getproxies().get("https"):
        return True
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def downloads_fail_fast() -> Iterator[None]:
    """Named weights that are not in the local cache fail at once where the Hub is unreachable.

    Left alone, huggingface_hub retries each request with back-off for half a minute or more
    before giving up. ``HF_HUB_OFFLINE`` is read once, when huggingface_hub is imported, so its
    module value is what switches the cache-only mode on here, for this block only.
    """
    if _hub_reachable():
        yield
        return
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


def weights_error(source: str, asked: Any, what: str) -> Callable[[Exception], Exception]:
    """The error for named weights that failed to download, or a file that failed to load."""
    if source == "file":
        return lambda err: _misfit(asked, what, [f"{type(err).__name__}: {err}"])
    return lambda err: WeightsUnavailableError(
        f"Pretrained weights {WEIGHTS_KEY}={asked} for {what} could not be downloaded or loaded "
        f"({type(err).__name__}: {err}). Without internet access, use {_FIX}, e.g. one "
        f"downloaded on a machine with internet access."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read by timm (``weights_only=True``, safetensors too)."""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:
        if not refused_as_unsafe(err):
            raise ConfigError(f"{WEIGHTS_KEY}={path}: cannot read a state dict: {err}") from err
        raise unsafe_file_error(WEIGHTS_KEY, path, _RESAVE_WEIGHTS) from err
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(
            f"{WEIGHTS_KEY}={path}: the file holds no state dict (parameter names mapped to "
            f"tensors, plain or under 'state_dict' / 'model')."
        )
    return tensors


def _misfit(path: Path, what: str, problems: list[str]) -> ConfigError:
    return ConfigError(
        f"{WEIGHTS_KEY}={path} does not fit {what}: {'; '.join(problems)}. The file must hold the "
        f"weights of the same encoder / model (e.g. saved with torch.save(net.state_dict(), path) "
        f"from a network built with the same name); or use {WEIGHTS_KEY}=imagenet or null."
    )


def _refuse_misfit(path: Path, what: str, problems: Mapping[str, list[str]]) -> None:
    """Raise naming up to five keys of each problem (``{"missing from the file": keys}``)."""
    found = [
        f"{len(keys)} keys {label} ({', '.join(keys[:5])}{', ...' * (len(keys) > 5)})"
        for label, keys in problems.items()
        if keys
    ]
    if found:
        raise _misfit(path, what, found)


def timm_file(path: Path, what: str, name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay`` to load a weights file, once the file is checked.

    timm loads non-strictly once it drops a head for another number of classes, so a file of
    another model would load in part, or not at all, without a word: the file's keys are
    checked against a weightless twin of the model (on the meta device where it builds there).
    """
    state = _read_state_dict(path)
    overlay = {**(model_kwargs.get("pretrained_cfg_overlay") or {}), "file": str(path)}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                twin = timm.create_model(name, **model_kwargs)
            break
        except Exception:
            continue
    else:
        return overlay  # a configuration error, which the build reports
    heads = twin.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    target = {k: v.shape for k, v in twin.state_dict().items()}
    body = [k for k in target if k.rpartition(".")[0] not in heads]
    own = {*body, *(k for k in state if k.rpartition(".")[0] in heads)}
    missing = [k for k in body if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    _refuse_misfit(
        path, what, {"missing from the file": missing, "unexpected in the file": unexpected}
    )
    head = target.keys() - body
    if head and all(k in state and state[k].shape == target[k] for k in head):
        # The file's head fits: say its classes are the model's, or timm drops it.
        overlay.update(num_classes=model_kwargs["num_classes"], label_offset=0)
    return overlay


def _strip_prefixes(key: str) -> str:
    while key.startswith(_KEY_PREFIXES):
        key = next(key[len(p) :] for p in _KEY_PREFIXES if key.startswith(p))
    return key


def load_encoder_file(encoder: nn.Module, path: Path, what: str, in_channels: int) -> None:
    """Load a weights file into a native smp encoder, strictly (see the module docstring)."""
    target = encoder.state_dict()
    by_name = {_strip_prefixes(k): k for k in target}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _read_state_dict(path).items():
        state.setdefault(_strip_prefixes(key), tensor)
    first_conv = next(f"{n}.weight" for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d))
    loaded, missing, misshaped = {}, [], []
    for name, key in by_name.items():
        if name not in state:
            missing += [] if key.endswith("num_batches_tracked") else [key]
            continue
        tensor, shape = state[name], target[key].shape
        if key == first_conv and tensor.ndim == 4 and shape[1] == in_channels != tensor.shape[1]:
            tensor = adapt_input_conv(in_channels, tensor, base_chans=tensor.shape[1])
        if tensor.shape == shape:
            loaded[key] = tensor
        else:
            misshaped.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(shape)}")
    modules = {name.partition(".")[0] for name in by_name}
    unexpected = [k for k in state if k not in by_name and k.partition(".")[0] in modules]
    problems = {"missing from the file": missing, "unexpected in the file": unexpected}
    _refuse_misfit(path, what, {**problems, "with other shapes": misshaped})
    nn.Module.load_state_dict(encoder, loaded, strict=False)  # past smp's overrides (densenet)
