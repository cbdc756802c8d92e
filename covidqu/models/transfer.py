"""Starting a segmentation network from a covidqu checkpoint of another run, decoder included.

``encoder.weights=RUN/checkpoints/best.ckpt`` takes the encoder of a covidqu checkpoint alone
(:mod:`covidqu.models.weights` reads a weights file's encoder keys and ignores the rest).
``encoder.load_decoder=true`` takes its decoder too, e.g. a lung model's decoder for an
infection model of the same architecture: every decoder tensor must be in the checkpoint under
the same name with the same shape, and the checkpoint must hold no decoder tensor the network
lacks, else a :class:`~covidqu.errors.ConfigError` names the layers, both shapes and the fix.

The head (``segmentation_head``; ``classification_head`` of ``task=multitask``) is loaded only
where the checkpoint was trained for this run's target (``data.target``) and its tensors fit.
Otherwise it is left at random even when the shapes agree: the head is what says which classes
the masks are of, and a lung model's head would start an infection model by predicting the
whole lung as infected; the encoder and decoder carry the features worth keeping.

Everything is read with ``torch.load(weights_only=True)``
(:func:`covidqu.models.checkpoint.read_checkpoint`): a file holding other Python objects is
refused, never unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidqu.errors import CheckpointError, ConfigError
from covidqu.models.checkpoint import WEIGHT_KEYS, read_checkpoint

#: The config key that asks for the decoder, and the one that names the checkpoint.
LOAD_DECODER_KEY = "encoder.load_decoder"
WEIGHTS_KEY = "encoder.weights"
#: The parts of a segmentation network, as reported and recorded.
PARTS = ("encoder", "decoder", "head")
#: The prefix of the network's tensors in a covidqu checkpoint's state dict (``CXRModule.net``).
_NET = "net."
#: How many misfit layers an error lists.
_SHOWN = 5
#: Network options that may differ between the checkpoint and this run (weights, classes).
_FREE_OPTIONS = frozenset({*WEIGHT_KEYS, "classes", "_target_"})


def part_of(key: str) -> str:
    """``encoder``, ``decoder`` or ``head`` (every other module of smp's networks)."""
    first = key.partition(".")[0]
    return first if first in ("encoder", "decoder") else "head"


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


@dataclass
class Source:
    """A covidqu checkpoint's network tensors (names without ``net.``) and what trained it."""

    path: Path
    state: dict[str, torch.Tensor]
    task: str
    target: str | None
    net: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Source:
        """Read ``path`` (``encoder.weights``) safely; refuse a file no covidqu run wrote."""
        p = Path(path).expanduser()
        try:
            ckpt = read_checkpoint(p, key=WEIGHTS_KEY)
        except CheckpointError as err:
            raise CheckpointError(
                f"{LOAD_DECODER_KEY}=true takes the decoder of a covidqu checkpoint: {err}. Or "
                f"drop {LOAD_DECODER_KEY} to take the encoder of {WEIGHTS_KEY} alone."
            ) from err
        recipe = ckpt["covidqu"]
        state = {
            k[len(_NET) :]: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith(_NET) and isinstance(v, torch.Tensor)
        }
        return cls(
            p,
            state,
            str((recipe.get("task") or {}).get("name")),
            (recipe.get("preprocess") or {}).get("target"),
            dict(recipe.get("net") or {}),
        )


@dataclass
class Transfer:
    """What a network takes from a checkpoint (:func:`plan`), per part, and what stays random."""

    source: Source
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    random: list[str] = field(default_factory=list)
    why_random: list[str] = field(default_factory=list)
    parameters: frozenset[str] = frozenset()
    numel: dict[str, int] = field(default_factory=dict)

    def count(self, keys: list[str], part: str) -> tuple[int, int]:
        """Tensors of ``part`` among ``keys``, and their learnable parameters (elements)."""
        mine = [k for k in keys if part_of(k) == part]
        return len(mine), sum(self.numel[k] for k in mine if k in self.parameters)

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{"loaded"|"random": {part: {"tensors": n, "parameters": n}}}``, plain values."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for state, keys in (("loaded", list(self.loaded)), ("random", self.random)):
            out[state] = {}
            for part in PARTS:
                tensors, params = self.count(keys, part)
                out[state][part] = {"tensors": tensors, "parameters": params}
        return out

    def describe(self) -> str:
        """One line for the log: where from, and each part loaded or left at random."""

        def say(keys: list[str]) -> str:
            found = [(p, *self.count(keys, p)) for p in PARTS]
            said = [f"{p} {n} tensors ({m:,} parameters)" for p, n, m in found if n]
            return ", ".join(said) or "nothing"

        src = self.source
        why = f" ({'; '.join(self.why_random)})" if self.why_random else ""
        return (
            f"initialised from {src.path} (task={src.task}, target={src.target}, "
            f"model={src.net.get('arch')}): loaded {say(list(self.loaded))}; left at random "
            f"{say(self.random)}{why}"
        )

    def record(self) -> dict[str, Any]:
        """What the run was initialised from, for the checkpoint's recipe (plain values)."""
        src = self.source
        return {
            "checkpoint": str(src.path),
            "task": src.task,
            "target": src.target,
            "arch": src.net.get("arch"),
            **self.counts(),
        }

    def apply(self, net: nn.Module) -> None:
        """Copy the planned tensors into ``net`` (the rest keeps its initialisation)."""
        nn.Module.load_state_dict(net, self.loaded, strict=False)  # past smp's overrides


def _differences(source: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(source) | set(model)) - _FREE_OPTIONS)
    return [
        f"model.{k}: {source.get(k)!r} there, {model.get(k)!r} here"
        for k in keys
        if source.get(k) != model.get(k)
    ]


def _refuse_misfit(
    source: Source, part: str, problems: dict[str, list[str]], model: Mapping[str, Any]
) -> None:
    said = [
        f"{len(layers)} {label}: {'; '.join(layers[:_SHOWN])}"
        + (f" and {len(layers) - _SHOWN} more" if len(layers) > _SHOWN else "")
        for label, layers in problems.items()
        if layers
    ]
    differ = _differences(source.net, model)
    options = f" The networks differ in: {'; '.join(differ)}." if differ else ""
    arch = source.net.get("arch")
    raise ConfigError(
        f"{LOAD_DECODER_KEY}=true: the {part} of {WEIGHTS_KEY}={source.path} (task={source.task}, "
        f"model={arch}) does not fit this run's network: {'; '.join(said)}.{options} Build the "
        f"same network as the checkpoint's (model={arch} with its options), or drop "
        f"{LOAD_DECODER_KEY} to take its encoder alone."
    )


def _misfits(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """The layers whose name or shape differs, by kind, each with its shape on both sides."""
    found: dict[str, list[str]] = {
        "layers of other shapes": [],
        "layers in the checkpoint only": [],
        "layers in this network only": [],
    }
    for key in sorted(own.keys() | state.keys()):
        if key in own and key in state:
            if own[key].shape != state[key].shape:
                found["layers of other shapes"].append(
                    f"{key}: checkpoint {_shape(state[key])}, model {_shape(own[key])}"
                )
        elif key in state:
            found["layers in the checkpoint only"].append(f"{key} {_shape(state[key])}")
        else:
            found["layers in this network only"].append(f"{key} {_shape(own[key])}")
    return found


def plan(net: nn.Module, source: Source, target: str | None, model: Mapping[str, Any]) -> Transfer:
    """What ``net`` takes from ``source``: its encoder and decoder, which must fit exactly, and
    its head where trained for ``target`` and fitting (see the module docstring); ``model`` is
    this run's network config, compared with the checkpoint's to name what differs."""
    own = net.state_dict()
    transfer = Transfer(
        source,
        parameters=frozenset(name for name, _ in net.named_parameters()),
        numel={k: v.numel() for k, v in own.items()},
    )
    for part in ("encoder", "decoder"):
        mine = {k: v for k, v in own.items() if part_of(k) == part}
        theirs = {k: v for k, v in source.state.items() if part_of(k) == part}
        if not theirs:
            raise ConfigError(
                f"{LOAD_DECODER_KEY}=true: {WEIGHTS_KEY}={source.path} (task={source.task}) holds "
                f"no {part}: give the checkpoint of a segmentation run, or drop {LOAD_DECODER_KEY}"
            )
        problems = _misfits(mine, theirs)
        if any(problems.values()):
            _refuse_misfit(source, part, problems, model)
        transfer.loaded.update(theirs)
    heads: dict[str, list[str]] = {}
    for key in own:
        if part_of(key) == "head":
            heads.setdefault(key.partition(".")[0], []).append(key)
    for module, keys in heads.items():
        theirs = {k: v for k, v in source.state.items() if k.partition(".")[0] == module}
        if source.target != target:
            why = f"{module}: trained for target {source.target}, this run's is {target}"
        elif not theirs:
            why = f"{module}: not in the checkpoint"
        elif any(_misfits({k: own[k] for k in keys}, theirs).values()):
            why = f"{module}: its layers differ in name or shape"
        else:
            transfer.loaded.update(theirs)
            continue
        transfer.random += keys
        transfer.why_random.append(why)
    return transfer


def load_decoder(
    net: nn.Module, weights: Any, target: str | None, model: Mapping[str, Any]
) -> Transfer:
    """Load the encoder, decoder and (where it fits, see above) head of the covidqu checkpoint
    ``weights`` into ``net``; what was loaded and what was left at random."""
    transfer = plan(net, Source.read(weights), target, model)
    transfer.apply(net)
    return transfer


def check_load_decoder(weights: Any, target: str | None, model: Mapping[str, Any]) -> None:
    """Refuse, before anything is built for real, a checkpoint whose decoder would not fit: the
    network ``model`` describes is built without weights (on the meta device where it can be)
    and planned against it."""
    from hydra.utils import instantiate

    source = Source.read(weights)
    config = {**model, **{k: None for k in WEIGHT_KEYS if k in model}}  # no download
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                net = instantiate(config)
            break
        except Exception:
            if device == "cpu":
                return  # a configuration error, which the build reports
    plan(net, source, target, model)
