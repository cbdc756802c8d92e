"""Network builders: segmentation networks (segmentation-models-pytorch) and classifiers (timm).

The configs in ``conf/model/`` instantiate :func:`build_segmentation_model` or
:func:`build_classifier`; the LightningModules receive the built network. Both return raw
logits.

Encoder / backbone weights (``encoder.weights`` in the config) come in three forms:

``null`` (also the strings ``"null"``, ``"none"`` and ``""``)
    random initialisation.
a weight name, e.g. ``imagenet``
    downloaded by smp / timm (Hugging Face Hub, or a torch.hub URL for some timm models) into
    their cache. Where the download fails (no internet, ``HF_HUB_OFFLINE=1``, a hub error, ...)
    the builders raise :class:`WeightsUnavailableError`; they never fall back to random weights
    on their own.
a path to a local file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.safetensors``)
    a state dict, plain or wrapped under ``"state_dict"`` / ``"model"`` (so Lightning checkpoints
    work too), with or without the prefixes ``module.``, ``model.``, ``encoder.``, ``net.``,
    ``backbone.``. A 3-channel first convolution is adapted to a 1-channel network by summing
    over its input channels (as smp and timm do for pretrained weights), and a ViT position
    embedding is resampled to the network's patch grid. Classifier-head weights that do not fit
    (another number of classes) are left at random initialisation. Every other weight of the
    encoder / classifier must be in the file with its shape, else a ValueError names the file
    and the keys. For an encoder, the file may hold more than the encoder: whole modules the
    encoder does not have (the classifier head, a final convolution or norm that a
    features-only encoder drops, the decoder of a segmentation checkpoint) are ignored; a file
    of a deeper variant of the same family (resnet34 into resnet18) is still refused.

Architecture constraints found with segmentation-models-pytorch 0.6 (1-channel input):

* Every architecture except ``unet`` needs image sides divisible by its encoder's output stride
  (32 for most; smp raises a RuntimeError saying how to pad).
* ``pan`` needs sides of at least 8 x its encoder output stride: 128 px at the default
  ``encoder_output_stride=16``; ``model.encoder_depth=3`` makes it work from 64 px. Its forward
  raises a ValueError saying so instead of PyTorch's pooling error.
* ``dpt`` needs a ``tu-`` (timm) encoder with ``forward_intermediates`` (ViTs such as
  ``tu-vit_small_patch16_224``; also many timm CNNs). ViTs fixed to one input size get
  ``dynamic_img_size=True`` unless ``img_size`` or ``dynamic_img_size`` is given, so they run at
  any size divisible by the patch size.
* ``unetplusplus`` and ``linknet`` do not support the ``mit_b*`` (SegFormer) encoders.
* Everything else builds and trains at 64 x 64 px with the smp and ``tu-`` encoders tried
  (resnet, densenet, efficientnet, mobilenet_v2, convnext, mit_b0).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "WeightsUnavailableError",
    "build_classifier",
    "build_segmentation_model",
]

#: Segmentation architectures: config name (``model=<name>``) -> segmentation-models-pytorch class.
ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
    "manet": "MAnet",
    "linknet": "Linknet",
    "pspnet": "PSPNet",
    "pan": "PAN",
    "upernet": "UPerNet",
    "segformer": "Segformer",
    "dpt": "DPT",
}

#: The config key through which every config passes the weights.
WEIGHTS_KEY = "encoder.weights"

#: Options smp still accepts (with a deprecation warning) outside the class signatures.
_DEPRECATED_OPTIONS = frozenset({"decoder_use_batchnorm"})
#: PAN's pyramid attention pools its deepest feature map three times: it needs 8 x 8 of them.
_PAN_MIN_GRID = 8

_NO_WEIGHTS = frozenset({"", "none", "null"})
_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Wrappers of a state dict inside a checkpoint file, tried in this order.
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
#: Leading key prefixes that wrappers add (DataParallel, torch.compile, Lightning, smp, timm).
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "net.", "backbone.")
#: Top-level module names of classifier heads, where a timm config does not name them.
_HEAD_NAMES = ("fc", "classifier", "head", "head_dist", "last_linear", "_fc")
#: smp encoder names whose timm classifier has another name (the rest differ by '-' vs '_').
_SMP_TO_TIMM = {
    "mobilenet_v2": "mobilenetv2_100",
    "inceptionv4": "inception_v4",
    "inceptionresnetv2": "inception_resnet_v2",
    "xception": "legacy_xception",
    "senet154": "legacy_senet154",
    "se_resnet50": "seresnet50",
    "se_resnet101": "seresnet101",
    "se_resnet152": "seresnet152",
    "se_resnext50_32x4d": "seresnext50_32x4d",
    "se_resnext101_32x4d": "seresnext101_32x4d",
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for by name but could not be downloaded.

    Raised instead of silently starting from random weights. The message names the two ways out:
    ``encoder.weights=null`` (random initialisation) and ``encoder.weights=/path/to/file.pth``.
    """


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------


def build_segmentation_model(
    arch: str,
    encoder_name: str = "resnet34",
    encoder_weights: str | os.PathLike[str] | None = "imagenet",
    in_channels: int = 1,
    classes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build a segmentation-models-pytorch network that returns raw logits.

    Args:
        arch: architecture, a key of :data:`ARCHITECTURES` (``model=<arch>``); the smp class
            name (``UnetPlusPlus``) is accepted too, in any case.
        encoder_name: any smp encoder (``resnet34``, ``densenet121``, ``efficientnet-b0``,
            ``mobilenet_v2``, ...) or any timm model as ``tu-<timm name>``; ``encoder.name``.
        encoder_weights: ``None`` for random initialisation; a weight name the encoder has
            (``imagenet``; for ``tu-`` encoders any timm pretrained tag, e.g. ``a1_in1k``), to
            download; or the path of a local state dict file for the encoder. See the module
            docstring. ``encoder.weights``.
        in_channels: input channels; 1 for chest X-rays.
        classes: output channels (``task.num_outputs``).
        **kwargs: passed on to the smp class: decoder options (``decoder_channels``,
            ``decoder_attention_type``, ``encoder_depth``, ...) and, for ``tu-`` encoders, extra
            ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...). Options the
            smp class would silently ignore are refused, and so is an output ``activation``.
            ``aux_params`` adds smp's classification head: the network then returns
            ``(masks, labels)``.

    Returns:
        The network; ``net(x)`` maps ``B x in_channels x H x W`` to ``B x classes x H x W``.

    Raises:
        ValueError: unknown architecture, encoder or weight name; a combination that cannot
            work; a weights file that does not fit the encoder.
        FileNotFoundError: ``encoder_weights`` names a file that does not exist.
        WeightsUnavailableError: named weights could not be downloaded.
    """
    key, model_cls = _resolve_arch(arch)
    encoder_name = _check_encoder_name(encoder_name)
    kwargs = {name: _plain(value) for name, value in kwargs.items()}
    what = f"the encoder of model={key} (encoder.name={encoder_name})"
    source, value = _parse_weights(encoder_weights)

    smp_weights: str | bool | None = None
    if source == "named":
        encoder_name, smp_weights = _smp_weights(encoder_name, value)
    elif source == "file":
        value = _existing_file(value)

    _check_options(key, model_cls, encoder_name, kwargs)
    auto_kwargs: dict[str, Any] = {}
    if key == "dpt":
        if not encoder_name.startswith("tu-"):
            raise ValueError(
                f"model=dpt needs a timm encoder through the tu- prefix, such as a ViT "
                f"(e.g. encoder=timm encoder.name=tu-vit_small_patch16_224 "
                f"encoder.timm_name=vit_small_patch16_224); got encoder.name={encoder_name}."
            )
        auto_kwargs = _dpt_size_kwargs(encoder_name[3:], kwargs)

    def build(weights: str | bool | None, extra: dict[str, Any]) -> nn.Module:
        return model_cls(
            encoder_name=encoder_name,
            encoder_weights=weights,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
            **extra,
        )

    context = f"model={key} with encoder.name={encoder_name}"
    model = _build(build, smp_weights, auto_kwargs, context, what, encoder_weights)

    if source == "file":
        _load_weights_file(
            model.encoder,
            value,
            what=what,
            in_channels=in_channels,
            ignore_extra_modules=True,
            head_names=tuple(dict.fromkeys(_timm_head_names(model.encoder) + _HEAD_NAMES)),
        )
    if key == "pan":
        model.register_forward_pre_hook(_check_pan_input_size)
    return model


def build_classifier(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    in_chans: int = 1,
    num_classes: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm image classifier that returns raw logits.

    Args:
        name: a timm model name (``resnet18``, ``convnext_tiny``, ``vit_small_patch16_224``,
            optionally with a pretrained tag, ``resnet50.a1_in1k``); smp encoder names are
            translated (``efficientnet-b0`` -> ``efficientnet_b0``, ``mobilenet_v2`` ->
            ``mobilenetv2_100``, ``tu-<timm name>`` -> ``<timm name>``) so that every encoder
            config works with ``task=classify``. ``model.name``.
        weights: ``None`` for random initialisation; ``imagenet`` (timm's default pretrained
            weights of the model) or another timm pretrained tag, to download; or the path of
            a local state dict file for the model. See the module docstring.
            ``encoder.weights``.
        in_chans: input channels; 1 for chest X-rays.
        num_classes: output logits; 3 for COVID-19 / Non-COVID / Normal.
        **kwargs: passed on to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``,
            ``img_size`` for ViTs, ...).

    Returns:
        The network; ``net(x)`` maps ``B x in_chans x H x W`` to ``B x num_classes``.

    Raises:
        ValueError: unknown model or weight name; a weights file that does not fit.
        FileNotFoundError: ``weights`` names a file that does not exist.
        WeightsUnavailableError: named weights could not be downloaded.
    """
    timm_name = _resolve_timm_name(name)
    kwargs = {key: _plain(value) for key, value in kwargs.items()}
    what = f"timm model '{timm_name}' (model.name={name})"
    source, value = _parse_weights(weights)

    pretrained = False
    if source == "named":
        timm_name = _timm_pretrained_name(timm_name, value)
        pretrained = True
    elif source == "file":
        value = _existing_file(value)

    def build(use_weights: bool, extra: dict[str, Any]) -> nn.Module:
        return timm.create_model(
            timm_name,
            pretrained=use_weights,
            in_chans=in_chans,
            num_classes=num_classes,
            **kwargs,
            **extra,
        )

    model = _build(build, pretrained or None, {}, f"model.name={name}", what, weights)

    if source == "file":
        _load_weights_file(
            model,
            value,
            what=what,
            in_channels=in_chans,
            ignore_extra_modules=False,
            head_names=_timm_head_names(model),
        )
    return model


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _resolve_arch(arch: str) -> tuple[str, type[nn.Module]]:
    """The config name and smp class of an architecture given by config or class name."""
    text = str(arch).strip().lower()
    by_class = {cls.lower(): key for key, cls in ARCHITECTURES.items()}
    key = text if text in ARCHITECTURES else by_class.get(text)
    if key is None:
        raise ValueError(
            f"model={arch} is not a known segmentation architecture. Valid choices: "
            f"{', '.join(ARCHITECTURES)} (or the segmentation-models-pytorch class names "
            f"{', '.join(ARCHITECTURES.values())})."
        )
    return key, getattr(smp, ARCHITECTURES[key])


def _close(word: str, choices: list[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _check_encoder_name(encoder_name: str) -> str:
    """Validate an smp encoder name (or ``tu-<timm name>``) and return it."""
    if not isinstance(encoder_name, str) or not encoder_name.strip():
        raise ValueError(f"encoder.name must be a non-empty string, got {encoder_name!r}.")
    name = encoder_name.strip()
    if name.startswith("tu-"):
        base = name[3:]
        if not timm.is_model(base):
            raise ValueError(
                f"encoder.name={name}: '{base}' is not a timm model."
                f"{_close(base, timm.list_models())} Any timm model works as tu-<timm name>; "
                f"find names with timm.list_models('pattern*')."
            )
        return name
    known = smp.encoders.get_encoder_names()
    converts = getattr(smp.encoders, "is_equivalent_to_timm_universal", lambda _: False)
    if name in known or converts(name):
        return name
    hint = ""
    for guess in (name, name.replace("-", "_")):
        if timm.is_model(guess):
            hint = f" '{guess}' is a timm model: use encoder.name=tu-{guess}."
            break
    raise ValueError(
        f"encoder.name={name} is not a segmentation-models-pytorch encoder.{_close(name, known)}"
        f"{hint} Valid choices: {', '.join(known)}; and any timm model through the tu- prefix "
        f"(encoder.name=tu-<timm name>, see timm.list_models('pattern*'))."
    )


def _resolve_timm_name(name: str) -> str:
    """The timm model name for a timm name, an smp encoder name or a ``tu-`` name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model.name must be a non-empty string, got {name!r}.")
    text = name.strip()
    candidates = [text]
    base = text[3:] if text.startswith("tu-") else text
    if base.startswith("timm-"):
        plain = base[len("timm-") :].replace("-", "_")
        candidates += [plain, f"tf_{plain}"]
    candidates += [base, _SMP_TO_TIMM.get(base, base), base.replace("-", "_")]
    for candidate in candidates:
        if timm.is_model(candidate):
            return candidate
    raise ValueError(
        f"model.name={name} is not a timm model (nor an smp encoder name with a timm "
        f"counterpart).{_close(base.replace('-', '_'), timm.list_models())} "
        f"Find timm names with timm.list_models('pattern*'), e.g. timm.list_models('*convnext*')."
    )


# --------------------------------------------------------------------------------------------
# Weights: which kind, named weights, downloads
# --------------------------------------------------------------------------------------------


def _parse_weights(weights: Any) -> tuple[str, Any]:
    """Classify a weights setting: ``("none", None)``, ``("named", str)``, ``("file", Path)``."""
    if weights is None or weights is False:
        return "none", None
    if weights is True:
        return "named", "imagenet"
    if isinstance(weights, os.PathLike):
        return "file", Path(weights).expanduser()
    if not isinstance(weights, str):
        raise ValueError(
            f"{WEIGHTS_KEY} must be null, a weight name such as imagenet, or a file path; "
            f"got {weights!r}."
        )
    text = weights.strip()
    if text.lower() in _NO_WEIGHTS:
        return "none", None
    path = Path(text).expanduser()
    looks_like_path = (
        "/" in text
        or os.sep in text
        or (os.altsep is not None and os.altsep in text)
        or text.startswith("~")
        or text.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    )
    if looks_like_path or path.is_file():
        return "file", path
    return "named", text


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{WEIGHTS_KEY}={path}: the weights file {state}. Point {WEIGHTS_KEY} at a state dict "
            f"file (.pth, .pt, .bin, .ckpt or .safetensors), or use {WEIGHTS_KEY}=imagenet "
            f"(download) or {WEIGHTS_KEY}=null (random init)."
        )
    return path


def _smp_weights(encoder_name: str, weights: str) -> tuple[str, str | bool]:
    """Encoder name and the ``encoder_weights`` argument smp wants for named weights."""
    if encoder_name.startswith("tu-"):
        return "tu-" + _timm_pretrained_name(encoder_name[3:], weights), True
    try:
        settings = smp.encoders.encoders[encoder_name]["pretrained_settings"]
    except KeyError:  # timm- names that smp converts to tu- itself
        return encoder_name, True
    if weights not in settings:
        raise ValueError(
            f"{WEIGHTS_KEY}={weights}: encoder '{encoder_name}' has no such pretrained weights. "
            f"Available: {', '.join(settings) or 'none'}; or {WEIGHTS_KEY}=null (random init) or "
            f"{WEIGHTS_KEY}=/path/to/state_dict.pth (a local file)."
        )
    return encoder_name, weights


def _timm_pretrained_name(timm_name: str, weights: str) -> str:
    """The timm name to create with ``pretrained=True`` for ``imagenet`` or a pretrained tag."""
    base, _, tag = timm_name.partition(".")
    if weights.lower() != "imagenet":
        if tag and tag != weights:
            raise ValueError(
                f"{WEIGHTS_KEY}={weights} conflicts with the pretrained tag in '{timm_name}'; "
                f"use {WEIGHTS_KEY}=imagenet to take the tag from the name."
            )
        tag = weights
    full = f"{base}.{tag}" if tag else base
    if tag and full not in timm.list_pretrained(full):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
        raise ValueError(
            f"{WEIGHTS_KEY}={weights}: timm model '{base}' has no pretrained weights '{tag}'. "
            f"Available tags: {', '.join(tags) or 'none'} (or {WEIGHTS_KEY}=imagenet for the "
            f"default, {WEIGHTS_KEY}=null for random init)."
        )
    if not tag and not timm.models.is_model_pretrained(base):
        raise ValueError(
            f"{WEIGHTS_KEY}=imagenet: timm model '{base}' has no pretrained weights. Use "
            f"{WEIGHTS_KEY}=null (random init) or {WEIGHTS_KEY}=/path/to/state_dict.pth."
        )
    return full


def _build(
    build: Any,
    weights: Any,
    extra: dict[str, Any],
    context: str,
    what: str,
    asked: Any,
) -> nn.Module:
    """Run ``build(weights, extra)``, telling a failed download from a bad configuration.

    A build with weights that fails is retried without them: where that works, the weights were
    the problem (:class:`WeightsUnavailableError`); otherwise the configuration was.
    """
    if weights is None:
        return _build_config(build, None, extra, context)
    try:
        return _call_build(build, weights, extra)
    except Exception as err:
        download_error = err
    _build_config(build, None, extra, context)  # raises the configuration error, if any
    raise WeightsUnavailableError(
        f"Pretrained weights {WEIGHTS_KEY}={asked} for {what} could not be downloaded or loaded "
        f"({type(download_error).__name__}: {download_error}). Without internet access (set "
        f"HF_HUB_OFFLINE=1 to fail fast), use {WEIGHTS_KEY}=null for random initialisation, or "
        f"{WEIGHTS_KEY}=/path/to/state_dict.pth to load a local file (e.g. one downloaded on a "
        f"machine with internet access)."
    ) from download_error


def _call_build(build: Any, weights: Any, extra: dict[str, Any]) -> nn.Module:
    try:
        return build(weights, extra)
    except TypeError as err:
        # An automatic option (dynamic_img_size) that this timm model does not take.
        if extra and any(name in str(err) for name in extra):
            return build(weights, {})
        raise


def _build_config(build: Any, weights: Any, extra: dict[str, Any], context: str) -> nn.Module:
    """Build, turning the errors smp / timm raise for bad options into ValueErrors with keys."""
    try:
        return _call_build(build, weights, extra)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(
            f"{context} cannot be built: {message} (check the model.* options of the config)"
        ) from err


def _check_options(
    key: str, model_cls: type[nn.Module], encoder_name: str, kwargs: Mapping[str, Any]
) -> None:
    """Refuse options that smp would silently drop (only ``tu-`` encoders take extra ones), and
    an output activation: the losses and metrics expect raw logits."""
    if kwargs.get("activation") not in (None, "identity"):
        raise ValueError(
            f"model={key}: model.activation={kwargs['activation']} is not supported: the networks "
            f"return raw logits and the losses / metrics apply sigmoid or softmax themselves. "
            f"Remove model.activation."
        )
    if encoder_name.startswith("tu-"):
        return  # timm refuses unknown ones itself
    params = inspect.signature(model_cls.__init__).parameters
    known = {name for name, p in params.items() if p.kind is not p.VAR_KEYWORD}
    known |= _DEPRECATED_OPTIONS
    unknown = [name for name in kwargs if name not in known and not name.startswith("_")]
    if unknown:
        options = sorted(
            known - {"self", "encoder_name", "encoder_weights", "in_channels", "classes"}
        )
        raise ValueError(
            f"model={key}: unknown option(s) {', '.join(f'model.{n}' for n in unknown)} for "
            f"{model_cls.__name__} with encoder.name={encoder_name}. Options: "
            f"{', '.join(options)}. (Extra options reach the encoder only for timm encoders, "
            f"encoder.name=tu-<name>.)"
        )


def _dpt_size_kwargs(timm_name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``dynamic_img_size=True`` for a ViT fixed to its training size, unless sizes are given."""
    if "img_size" in kwargs or "dynamic_img_size" in kwargs:
        return {}
    cfg = timm.get_pretrained_cfg(timm_name)
    return {"dynamic_img_size": True} if cfg is not None and cfg.fixed_input_size else {}


def _check_pan_input_size(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of PAN: refuse inputs too small for its pyramid attention."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or not args:
        return
    height, width = args[0].shape[-2:]
    stride = module.encoder.output_stride
    minimum = _PAN_MIN_GRID * stride
    if height < minimum or width < minimum:
        raise ValueError(
            f"model=pan needs images of at least {minimum} x {minimum} px ({_PAN_MIN_GRID} x its "
            f"encoder output stride {stride}), got {height} x {width}. Use "
            f"data.image_size>={minimum}, or model.encoder_depth=3 (output stride 8: from 64 px)."
        )


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain lists / dicts, which smp and timm expect."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


# --------------------------------------------------------------------------------------------
# Weights: local files
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file, unwrapped from a checkpoint if need be."""
    try:
        if path.name.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                # A checkpoint with Python objects besides tensors (e.g. Lightning's
                # hyper-parameters); the user named this file, so trust it.
                warnings.warn(
                    f"{WEIGHTS_KEY}={path}: the file holds Python objects besides tensors; "
                    f"loading it with weights_only=False.",
                    stacklevel=3,
                )
                obj = torch.load(path, map_location="cpu", weights_only=False)
    except ImportError as err:
        raise ValueError(f"{WEIGHTS_KEY}={path}: reading it needs a package: {err}") from err
    except Exception as err:
        raise ValueError(
            f"{WEIGHTS_KEY}={path}: cannot read the file as a PyTorch or safetensors state dict "
            f"({type(err).__name__}: {err})."
        ) from err

    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in _STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping | nn.Module)),
            None,
        )
        if inner is None:
            break
        obj = inner
    tensors = (
        {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not tensors:
        raise ValueError(
            f"{WEIGHTS_KEY}={path}: the file holds no state dict (a mapping of parameter names "
            f"to tensors, plain or under 'state_dict' / 'model'); found {type(obj).__name__}."
        )
    return tensors


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def _flattened_variants(key: str) -> list[tuple[str, str]]:
    """Original names of a key from a timm features-only net (``stages_0.x`` -> ``stages.0.x``).

    Returns (original key, the original name of the module the flattened top-level stands for).
    """
    first, _, rest = key.partition(".")
    variants = []
    for i, char in enumerate(first):
        if char == "_" and 0 < i < len(first) - 1:
            module = f"{first[:i]}.{first[i + 1 :]}"
            variants.append((f"{module}.{rest}" if rest else module, module))
    return variants


def _match_keys(file_keys: list[str], target_keys: list[str]) -> tuple[dict[str, str], set[str]]:
    """Map target keys to file keys; also return the module prefixes the target has.

    A target key matches a file key exactly, after stripping wrapper prefixes on both sides, or
    after undoing a timm features-only flattening. Where no key matches, a first name segment
    shared by all file keys (a wrapper attribute such as ``net.``) is dropped and it is retried.
    """

    def attempt(keys: list[str]) -> tuple[dict[str, str], set[str]]:
        exact = set(keys)
        by_norm: dict[str, str] = {}
        for k in keys:
            by_norm.setdefault(_strip_prefixes(k), k)
        mapping: dict[str, str] = {}
        modules: set[str] = set()
        for target in target_keys:
            norm = _strip_prefixes(target)
            if target in exact:
                mapping[target] = target
                modules.add(norm.partition(".")[0])
            elif norm in by_norm:
                mapping[target] = by_norm[norm]
                modules.add(norm.partition(".")[0])
            else:
                for variant, module in _flattened_variants(norm):
                    if variant in by_norm:
                        mapping[target] = by_norm[variant]
                        modules.add(module)
                        break
        return mapping, modules

    mapping, modules = attempt(file_keys)
    firsts = {k.partition(".")[0] for k in file_keys}
    if not mapping and len(firsts) == 1 and all("." in k for k in file_keys):
        first = next(iter(firsts))
        trimmed = [k[len(first) + 1 :] for k in file_keys]
        mapping, modules = attempt(trimmed)
        mapping = {t: f"{first}.{f}" for t, f in mapping.items()}
    return mapping, modules


def _timm_head_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the classifier head(s) of a timm model (or of the timm model in an encoder)."""
    for candidate in (module, getattr(module, "model", None)):
        cfg = getattr(candidate, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("classifier"):
            names = cfg["classifier"]
            return (names,) if isinstance(names, str) else tuple(names)
    return _HEAD_NAMES


def _is_head(key: str, head_names: tuple[str, ...]) -> bool:
    norm = _strip_prefixes(key)
    return any(norm == name or norm.startswith(name + ".") for name in head_names)


def _adapt_input_conv(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A first-convolution weight for another number of input channels (smp / timm convention)."""
    if target.shape[1] == 1:
        return source.sum(dim=1, keepdim=True)
    channels = source.shape[1]
    repeats = math.ceil(target.shape[1] / channels)
    weight = source.repeat(1, repeats, 1, 1)[:, : target.shape[1]]
    return weight * (channels / target.shape[1])


def _resample_pos_embed(
    root: nn.Module, key: str, source: torch.Tensor, target: torch.Tensor
) -> torch.Tensor | None:
    """A ViT position embedding resampled to the model's patch grid, or None if not possible."""
    from timm.layers import resample_abs_pos_embed

    owner_name = key.rpartition(".")[0]
    owner = root.get_submodule(owner_name) if owner_name else root
    prefix = getattr(owner, "num_prefix_tokens", 1)
    if getattr(owner, "no_embed_class", False):
        prefix = 0
    old_tokens, new_tokens = source.shape[1] - prefix, target.shape[1] - prefix
    old_side, new_side = math.isqrt(max(old_tokens, 0)), math.isqrt(max(new_tokens, 0))
    grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
    new_grid = list(grid) if grid else [new_side, new_side]
    if old_side * old_side != old_tokens or new_grid[0] * new_grid[1] != new_tokens:
        return None
    return resample_abs_pos_embed(
        source, new_size=new_grid, old_size=[old_side, old_side], num_prefix_tokens=prefix
    )


def _load_weights_file(
    module: nn.Module,
    path: Path,
    *,
    what: str,
    in_channels: int,
    ignore_extra_modules: bool,
    head_names: tuple[str, ...],
) -> None:
    """Load a state dict file into ``module`` (an encoder or a timm classifier), strictly.

    Every parameter and buffer of ``module`` must come from the file with its shape, except:
    BatchNorm's ``num_batches_tracked``; classifier-head weights (``head_names``) that are
    missing or have another shape (another number of classes); a first convolution for another
    number of input channels (adapted); a ViT position embedding for another grid (resampled).
    Keys of the file that ``module`` lacks are an error, unless ``ignore_extra_modules`` and
    they belong to a module that ``module`` lacks entirely (a head, a decoder, ...).
    """
    file_sd = _read_state_dict(path)
    target_sd = module.state_dict()
    mapping, modules = _match_keys(list(file_sd), list(target_sd))
    first_conv = next(
        (f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Conv2d)), None
    )

    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    for target_key, target in target_sd.items():
        file_key = mapping.get(target_key)
        if file_key is None:
            if not (target_key.endswith("num_batches_tracked") or _is_head(target_key, head_names)):
                missing.append(target_key)
            continue
        source = file_sd[file_key]
        if source.shape == target.shape:
            loaded[target_key] = source
            continue
        adapted = None
        if (
            target_key == first_conv
            and source.ndim == 4
            and target.shape[1] == in_channels
            and source.shape[0] == target.shape[0]
            and source.shape[2:] == target.shape[2:]
        ):
            adapted = _adapt_input_conv(source, target)
        elif (
            target_key.endswith("pos_embed")
            and source.ndim == target.ndim == 3
            and source.shape[0] == target.shape[0]
            and source.shape[2] == target.shape[2]
        ):
            adapted = _resample_pos_embed(module, target_key, source, target)
        if adapted is not None:
            loaded[target_key] = adapted
        elif not _is_head(target_key, head_names):
            misshaped.append(
                f"{file_key}: file {tuple(source.shape)} vs model {tuple(target.shape)}"
            )

    used = set(mapping.values())
    unexpected = []
    for file_key in file_sd:
        if file_key in used or _is_head(file_key, head_names):
            continue
        norm = _strip_prefixes(file_key)
        if ignore_extra_modules and not any(norm == m or norm.startswith(m + ".") for m in modules):
            continue
        unexpected.append(file_key)

    if missing or unexpected or misshaped:
        problems = []
        for label, keys in (
            ("missing from the file", missing),
            ("unexpected in the file", unexpected),
            ("with other shapes", misshaped),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                problems.append(f"{len(keys)} keys {label} ({shown})")
        raise ValueError(
            f"{WEIGHTS_KEY}={path} does not fit {what}: {'; '.join(problems)}. The file must hold "
            f"the weights of the same encoder / model (e.g. saved with "
            f"torch.save(net.state_dict(), path) from a network built with the same name)."
        )

    result = nn.Module.load_state_dict(module, loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
