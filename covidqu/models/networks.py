"""Network builders: segmentation networks (segmentation-models-pytorch) and classifiers (timm).

The configs in ``conf/model/`` instantiate :func:`build_segmentation_model` (``smp.create_model``
under smp's own architecture names: a new smp architecture needs only a config file, which also
says what the architecture needs; all but ``unet`` need image sides divisible by the encoder's
output stride, 32 for most) or :func:`build_classifier` (``timm.create_model``). Both return raw
logits. Their weights (``encoder.weights``: ``null``, a name such as ``imagenet``, or a local
file) are resolved by :mod:`covidqu.models.weights`.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from covidqu.constants import CLASSES
from covidqu.errors import ConfigError
from covidqu.models.weights import (
    WeightsUnavailableError,
    downloads_fail_fast,
    load_encoder_file,
    parse_weights,
    smp_weights,
    timm_file,
    timm_pretrained_name,
    weights_error,
)
from covidqu.resolvers import to_plain

__all__ = ["WeightsUnavailableError", "build_classifier", "build_segmentation_model"]


#: Options smp still accepts (with a deprecation warning) outside the class signatures.
_DEPRECATED_OPTIONS = frozenset({"decoder_use_batchnorm"})
#: PAN's pyramid attention pools its deepest feature map three times: it needs 8 x 8 of them.
_PAN_MIN_GRID = 8
#: smp encoder names whose timm classifier has another name (the rest differ by '-' vs '_').
_SMP_TO_TIMM = {
    "mobilenet_v2": "mobilenetv2_100",
    "inceptionv4": "inception_v4",
    "inceptionresnetv2": "inception_resnet_v2",
    "xception": "legacy_xception",
    "senet154": "legacy_senet154",
    **{f"se_resnet{n}": f"seresnet{n}" for n in (50, 101, 152)},
    **{f"se_resnext{n}_32x4d": f"seresnext{n}_32x4d" for n in (50, 101)},
}


def build_segmentation_model(
    arch: str,
    encoder_name: str = "resnet34",
    encoder_weights: str | os.PathLike[str] | None = "imagenet",
    in_channels: int = 1,
    classes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build a segmentation-models-pytorch network; ``net(x)`` maps ``B x in_channels x H x W``
    to logits ``B x classes x H x W``.

    Args:
        arch: an architecture in smp's registry (``smp.create_model``), in any case: ``unet``,
            ``UnetPlusPlus``, ``fpn``, ...; ``model.arch``.
        encoder_name: any smp encoder (``resnet34``, ``efficientnet-b0``, ...) or any timm model
            as ``tu-<timm name>``; ``encoder.name``.
        encoder_weights: ``None``, a weight name the encoder has (``imagenet``; for ``tu-``
            encoders any timm pretrained tag) or a file path (module docstring);
            ``encoder.weights``.
        in_channels: input channels; 1 for chest X-rays.
        classes: output channels (``task.num_outputs``).
        **kwargs: passed on to smp: decoder options (``decoder_channels``, ``encoder_depth``,
            ...; ``aux_params`` adds smp's classification head, the network then returns
            ``(masks, labels)``) and, for ``tu-`` encoders, ``timm.create_model`` arguments
            (``img_size``, ...). Options smp would silently ignore are refused, and so is an
            output ``activation``.

    Raises ValueError (an unknown name, a combination that cannot work, a weights file that does
    not fit), FileNotFoundError (no such weights file) or :class:`WeightsUnavailableError`.
    """
    key, model_cls = _resolve_arch(arch)
    encoder_name = _check_encoder_name(encoder_name)
    kwargs = {name: to_plain(value) for name, value in kwargs.items()}
    _check_options(key, model_cls, encoder_name, kwargs)
    auto = _dpt_kwargs(key, encoder_name, kwargs) if issubclass(model_cls, smp.DPT) else {}
    what = f"the encoder of model={key} (encoder.name={encoder_name})"
    source, value = parse_weights(encoder_weights)
    weights: str | bool | None = None
    if source == "named":
        encoder_name, weights = smp_weights(encoder_name, value)
    elif source == "file" and encoder_name.startswith("tu-"):
        timm_kwargs = {k: v for k, v in kwargs.items() if k not in _options(model_cls)}
        model_kwargs = dict(in_chans=in_channels, num_classes=0, **timm_kwargs)
        kwargs["pretrained_cfg_overlay"] = timm_file(value, what, encoder_name[3:], model_kwargs)
        weights = True

    def build(weights: str | bool | None) -> nn.Module:
        args = dict(encoder_name=encoder_name, encoder_weights=weights, in_channels=in_channels)
        try:
            return smp.create_model(key, classes=classes, **args, **kwargs, **auto)
        except TypeError as err:  # a fixed-size timm model without dynamic_img_size
            if not auto or "dynamic_img_size" not in str(err):
                raise
            return smp.create_model(key, classes=classes, **args, **kwargs)

    context = f"model={key} with encoder.name={encoder_name}"
    model = _build(build, weights, context, weights_error(source, value, what))
    if source == "file" and weights is None:
        load_encoder_file(model.encoder, value, what, in_channels)
    if issubclass(model_cls, smp.PAN):
        model.register_forward_pre_hook(_check_pan_input_size)
    return model


def build_classifier(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    in_chans: int = 1,
    num_classes: int = len(CLASSES),
    **kwargs: Any,
) -> nn.Module:
    """Build a timm image classifier; ``net(x)`` maps ``B x in_chans x H x W`` to logits
    ``B x num_classes``.

    Args:
        name: a timm model name (``resnet18``, ``convnext_tiny``, ``resnet50.a1_in1k``, ...);
            smp encoder names are translated (``efficientnet-b0`` -> ``efficientnet_b0``,
            ``mobilenet_v2`` -> ``mobilenetv2_100``, ``tu-<timm name>`` -> ``<timm name>``) so
            that every encoder config works with ``task=classify``. ``model.name``.
        weights: ``None``, ``imagenet`` (timm's default pretrained weights) or another timm
            pretrained tag, or a file path (module docstring); ``encoder.weights``.
        in_chans: input channels; 1 for chest X-rays.
        num_classes: output logits; one per class of ``CLASSES`` by default.
        **kwargs: passed on to ``timm.create_model`` (``drop_rate``, ``img_size``, ...).

    Raises ValueError (an unknown name, a weights file that does not fit), FileNotFoundError (no
    such weights file) or :class:`WeightsUnavailableError`.
    """
    timm_name = _resolve_timm_name(name)
    kwargs = {key: to_plain(value) for key, value in kwargs.items()}
    what = f"timm model '{timm_name}' (model.name={name})"
    source, value = parse_weights(weights)
    pretrained = None
    if source == "named":
        timm_name, pretrained = timm_pretrained_name(timm_name, value), True
    elif source == "file":
        model_kwargs = dict(in_chans=in_chans, num_classes=num_classes, **kwargs)
        kwargs["pretrained_cfg_overlay"] = timm_file(value, what, timm_name, model_kwargs)
        pretrained = True

    def build(use: bool | None) -> nn.Module:
        return timm.create_model(
            timm_name, pretrained=bool(use), in_chans=in_chans, num_classes=num_classes, **kwargs
        )

    return _build(build, pretrained, f"model.name={name}", weights_error(source, value, what))


def check_input_size(net: nn.Module, image_size: int | Sequence[int]) -> None:
    """Refuse a ``data.image_size`` the network cannot take, before any training step.

    smp's networks know the sides they accept (a multiple of their output stride) and say so in
    ``check_input_shape``; a classifier takes any size.
    """
    check = getattr(net, "check_input_shape", None)
    if check is None:
        return
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    try:
        check(torch.empty(1, 1, int(h), int(w), device="meta"))
    except RuntimeError as err:
        raise ConfigError(f"data.image_size={image_size} does not fit this network: {err}") from err


def _resolve_arch(arch: str) -> tuple[str, type[nn.Module]]:
    """smp's name and class of an architecture, from smp's own registry."""
    registry: Mapping[str, type[nn.Module]] = smp.MODEL_ARCHITECTURES_MAPPING
    key = str(arch).strip().lower()
    if key not in registry:
        raise ValueError(
            f"model={arch} is not a segmentation-models-pytorch architecture."
            f"{_close(key, list(registry))} Valid choices: {', '.join(registry)} (in any case)."
        )
    return key, registry[key]


def _close(word: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(word, choices, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _check_encoder_name(encoder_name: str) -> str:
    """Validate an smp encoder name (or ``tu-<timm name>``) and return it."""
    if not isinstance(encoder_name, str) or not encoder_name.strip():
        raise ValueError(f"encoder.name must be a non-empty string, got {encoder_name!r}.")
    name = encoder_name.strip()
    any_timm = "any timm model through the tu- prefix (see timm.list_models('pattern*'))"
    if name.startswith("tu-"):
        if timm.is_model(name[3:]):
            return name
        close = _close(name[3:], timm.list_models())
        raise ValueError(f"encoder.name={name}: not a timm model.{close} Use {any_timm}.")
    known = smp.encoders.get_encoder_names()
    if name in known or smp.encoders.is_equivalent_to_timm_universal(name):
        return name
    guess = next((g for g in (name, name.replace("-", "_")) if timm.is_model(g)), None)
    hint = f" '{guess}' is a timm model: use encoder.name=tu-{guess}." if guess else ""
    raise ValueError(
        f"encoder.name={name} is not a segmentation-models-pytorch encoder.{_close(name, known)}"
        f"{hint} Valid choices: {', '.join(known)}; and {any_timm}."
    )


def _resolve_timm_name(name: str) -> str:
    """The timm model name for a timm name, an smp encoder name or a ``tu-`` name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model.name must be a non-empty string, got {name!r}.")
    base = name.strip().removeprefix("tu-")
    plain = base.removeprefix("timm-").replace("-", "_")
    candidates = [name.strip(), base, _SMP_TO_TIMM.get(base, base), plain, f"tf_{plain}"]
    found = next((c for c in candidates if timm.is_model(c)), None)
    if found is None:
        raise ValueError(
            f"model.name={name} is not a timm model (nor an smp encoder name with a timm "
            f"counterpart).{_close(plain, timm.list_models())} Find timm names with "
            f"timm.list_models('pattern*'), e.g. timm.list_models('*convnext*')."
        )
    return found


def _options(model_cls: type[nn.Module]) -> set[str]:
    """The named options of an smp class (the rest of its kwargs go to a timm encoder)."""
    params = inspect.signature(model_cls.__init__).parameters
    return {name for name, p in params.items() if p.kind is not p.VAR_KEYWORD}


def _check_options(key: str, model_cls: type, encoder_name: str, kwargs: Mapping) -> None:
    """Refuse options that smp would silently drop (only ``tu-`` encoders take extra ones), and
    an output activation: the losses and metrics expect raw logits."""
    if kwargs.get("activation") not in (None, "identity"):
        raise ValueError(
            f"model={key}: model.activation={kwargs['activation']} is not supported: the networks "
            f"return raw logits, the losses / metrics apply sigmoid or softmax themselves. "
            f"Remove model.activation."
        )
    known = _options(model_cls) | _DEPRECATED_OPTIONS
    unknown = [n for n in kwargs if n not in known and not n.startswith("_")]
    if unknown and not encoder_name.startswith("tu-"):  # timm refuses unknown ones itself
        options = known - {"self", "encoder_name", "encoder_weights", "in_channels", "classes"}
        raise ValueError(
            f"model={key}: unknown option(s) {', '.join(f'model.{n}' for n in unknown)} for "
            f"{model_cls.__name__} with encoder.name={encoder_name}. Options: "
            f"{', '.join(sorted(options))}. (Extra options reach the encoder only for timm "
            f"encoders, encoder.name=tu-<name>.)"
        )


def _dpt_kwargs(key: str, encoder_name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """DPT takes timm encoders only; a ViT fixed to its training size gets
    ``dynamic_img_size=True`` unless sizes are given, to run at any multiple of its patch."""
    if not encoder_name.startswith("tu-"):
        raise ValueError(
            f"model={key} needs a timm encoder through the tu- prefix, such as a ViT "
            f"(e.g. encoder=timm encoder.name=tu-vit_small_patch16_224 "
            f"encoder.timm_name=vit_small_patch16_224); got encoder.name={encoder_name}."
        )
    if "img_size" in kwargs or "dynamic_img_size" in kwargs:
        return {}
    cfg = timm.get_pretrained_cfg(encoder_name[3:])
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


def _build(build: Callable, weights: Any, context: str, weights_error: Callable) -> nn.Module:
    """Run ``build(weights)``; where that fails but a build without weights works, the weights
    were the problem (``weights_error``), otherwise the configuration (a ValueError naming it)."""
    failure = None
    if weights is not None:
        try:
            with downloads_fail_fast():
                return build(weights)
        except Exception as err:
            failure = err
    try:
        model = build(None)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(
            f"{context} cannot be built: {message} (check the model.* options)"
        ) from err
    if failure is not None:
        raise weights_error(failure) from failure
    return model
