"""Network builders: segmentation networks (segmentation-models-pytorch) and classifiers (timm).

The configs in ``conf/model/`` instantiate :func:`build_segmentation_model` (``smp.create_model``
under smp's own architecture names: a new smp architecture needs only a config file, which also
says what the architecture needs; all but ``unet`` need image sides divisible by the encoder's
output stride, 32 for most) or :func:`build_classifier` (``timm.create_model``). Both return raw
logits. Weights (``encoder.weights``) are ``null`` (random init; also ``"none"``, ``""``); a
name (``imagenet``, a timm tag), downloaded by smp / timm, where a failed download raises
:class:`WeightsUnavailableError` and never falls back to random weights; or a local file.

A weights file is a state dict, plain or under ``"state_dict"`` / ``"model"``, read as timm reads
it and always with ``weights_only=True`` (a file holding arbitrary Python objects is refused).
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

import difflib
import inspect
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from timm.models import adapt_input_conv, load_state_dict
from torch import nn

__all__ = ["WeightsUnavailableError", "build_classifier", "build_segmentation_model"]

#: The config key through which every config passes the weights.
WEIGHTS_KEY = "encoder.weights"
_FIX = f"{WEIGHTS_KEY}=null (random init) or {WEIGHTS_KEY}=/path/to/state_dict.pth (a local file)"

#: Options smp still accepts (with a deprecation warning) outside the class signatures.
_DEPRECATED_OPTIONS = frozenset({"decoder_use_batchnorm"})
#: PAN's pyramid attention pools its deepest feature map three times: it needs 8 x 8 of them.
_PAN_MIN_GRID = 8
_NO_WEIGHTS = frozenset({"", "none", "null"})
_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Leading key prefixes that wrappers add (DataParallel, torch.compile, Lightning, smp, timm).
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "net.", "backbone.")
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


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for by name but could not be downloaded.

    Raised instead of silently starting from random weights. The message names the two ways out:
    ``encoder.weights=null`` (random initialisation) and ``encoder.weights=/path/to/file.pth``.
    """


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
    kwargs = {name: _plain(value) for name, value in kwargs.items()}
    _check_options(key, model_cls, encoder_name, kwargs)
    auto = _dpt_kwargs(key, encoder_name, kwargs) if issubclass(model_cls, smp.DPT) else {}
    what = f"the encoder of model={key} (encoder.name={encoder_name})"
    source, value = _parse_weights(encoder_weights)
    weights: str | bool | None = None
    if source == "named":
        encoder_name, weights = _smp_weights(encoder_name, value)
    elif source == "file" and encoder_name.startswith("tu-"):
        timm_kwargs = {k: v for k, v in kwargs.items() if k not in _options(model_cls)}
        model_kwargs = dict(in_chans=in_channels, num_classes=0, **timm_kwargs)
        kwargs["pretrained_cfg_overlay"] = _timm_file(value, what, encoder_name[3:], model_kwargs)
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
    model = _build(build, weights, context, _weights_error(source, value, what))
    if source == "file" and weights is None:
        _load_encoder_file(model.encoder, value, what, in_channels)
    if issubclass(model_cls, smp.PAN):
        model.register_forward_pre_hook(_check_pan_input_size)
    return model


def build_classifier(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    in_chans: int = 1,
    num_classes: int = 3,
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
        num_classes: output logits; 3 for COVID-19 / Non-COVID / Normal.
        **kwargs: passed on to ``timm.create_model`` (``drop_rate``, ``img_size``, ...).

    Raises ValueError (an unknown name, a weights file that does not fit), FileNotFoundError (no
    such weights file) or :class:`WeightsUnavailableError`.
    """
    timm_name = _resolve_timm_name(name)
    kwargs = {key: _plain(value) for key, value in kwargs.items()}
    what = f"timm model '{timm_name}' (model.name={name})"
    source, value = _parse_weights(weights)
    pretrained = None
    if source == "named":
        timm_name, pretrained = _timm_pretrained_name(timm_name, value), True
    elif source == "file":
        model_kwargs = dict(in_chans=in_chans, num_classes=num_classes, **kwargs)
        kwargs["pretrained_cfg_overlay"] = _timm_file(value, what, timm_name, model_kwargs)
        pretrained = True

    def build(use: bool | None) -> nn.Module:
        return timm.create_model(
            timm_name, pretrained=bool(use), in_chans=in_chans, num_classes=num_classes, **kwargs
        )

    return _build(build, pretrained, f"model.name={name}", _weights_error(source, value, what))


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


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain lists / dicts, which smp and timm expect."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _parse_weights(weights: Any) -> tuple[str, Any]:
    """``("none", None)``, ``("named", str)`` or ``("file", Path)``; a file must exist."""
    if weights is None or weights is False:
        return "none", None
    if weights is True:
        return "named", "imagenet"
    if not isinstance(weights, str | os.PathLike):
        raise ValueError(f"{WEIGHTS_KEY} must be null, a weight name or a path; got {weights!r}.")
    text = os.fspath(weights).strip()
    path = Path(text).expanduser()
    if isinstance(weights, str) and not path.is_file():
        if text.lower() in _NO_WEIGHTS:
            return "none", None
        if not any(c in text for c in "/\\~") and not text.lower().endswith(_WEIGHT_FILE_SUFFIXES):
            return "named", text
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{WEIGHTS_KEY}={path}: the weights file {state}. Point {WEIGHTS_KEY} at a state dict "
            f"file (.pth, .pt, .bin, .ckpt or .safetensors), or use {WEIGHTS_KEY}=imagenet "
            f"(download) or {WEIGHTS_KEY}=null (random init)."
        )
    return "file", path


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
            f"Available: {', '.join(settings) or 'none'}; or {_FIX}."
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
        tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*"))
        raise ValueError(
            f"{WEIGHTS_KEY}={weights}: timm model '{base}' has no pretrained weights '{tag}'. "
            f"Available tags: {tags or 'none'}; or {WEIGHTS_KEY}=imagenet (the default), {_FIX}."
        )
    if not tag and not timm.models.is_model_pretrained(base):
        raise ValueError(f"{WEIGHTS_KEY}=imagenet: '{base}' has no pretrained weights. Use {_FIX}.")
    return full


def _build(build: Callable, weights: Any, context: str, weights_error: Callable) -> nn.Module:
    """Run ``build(weights)``; where that fails but a build without weights works, the weights
    were the problem (``weights_error``), otherwise the configuration (a ValueError naming it)."""
    failure = None
    if weights is not None:
        try:
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


def _weights_error(source: str, asked: Any, what: str) -> Callable[[Exception], Exception]:
    """The error for named weights that failed to download, or a file that failed to load."""
    if source == "file":
        return lambda err: _misfit(asked, what, [f"{type(err).__name__}: {err}"])
    return lambda err: WeightsUnavailableError(
        f"Pretrained weights {WEIGHTS_KEY}={asked} for {what} could not be downloaded or loaded "
        f"({type(err).__name__}: {err}). Without internet access (set HF_HUB_OFFLINE=1 to fail "
        f"fast), use {_FIX}, e.g. one downloaded on a machine with internet access."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read by timm (``weights_only=True``, safetensors too)."""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:
        if pickle.UnpicklingError not in (type(err), type(err.__cause__)):
            raise ValueError(f"{WEIGHTS_KEY}={path}: cannot read a state dict: {err}") from err
        raise ValueError(
            f"{WEIGHTS_KEY}={path}: the file holds Python objects besides tensors, and weights "
            f"files load with weights_only=True only (unpickling objects could run code). Save "
            f"the weights alone instead: torch.save(net.state_dict(), path)."
        ) from err
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{WEIGHTS_KEY}={path}: the file holds no state dict (parameter names mapped to "
            f"tensors, plain or under 'state_dict' / 'model')."
        )
    return tensors


def _misfit(path: Path, what: str, problems: list[str]) -> ValueError:
    return ValueError(
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


def _timm_file(path: Path, what: str, name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _load_encoder_file(encoder: nn.Module, path: Path, what: str, in_channels: int) -> None:
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
