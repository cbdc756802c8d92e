"""Rebuilding a trained module from its checkpoint alone.

Every checkpoint written by a covidqu run holds, under the ``covidqu`` key, the plain-dict
configs of the network, loss and metrics, the module's class and options, and the data
preprocessing (image size, normalisation, target). Evaluation and prediction use these, never
the user's current config, so a changed default cannot silently change how images are resized
or normalised.

Checkpoints, like weights files, are shared and downloaded; reading one must never run code.
Every checkpoint is therefore read with ``torch.load(weights_only=True)`` (by Lightning's own
``weights_only`` argument when training resumes), which unpickles tensors and plain values only;
a file holding any other Python object is refused with a :class:`CheckpointError` that names it
(:func:`unsafe_file_error`). covidqu writes only plain values into its checkpoints.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate

from covidqu.errors import CheckpointError, MissingFileError
from covidqu.models.base import CXRModule
from covidqu.models.calibration import read_temperature

#: Keys of a network config that ask for pretrained weights; loading a checkpoint sets them to
#: ``None`` because the checkpoint's own weights replace them (and no download is attempted).
WEIGHT_KEYS = ("encoder_weights", "weights")


#: How to turn a trusted checkpoint that holds Python objects into one that loads safely.
RESAVE_CHECKPOINT = (
    "If the file comes from a source you trust, re-save a clean copy: "
    "ckpt = torch.load(PATH, weights_only=False); replace those objects by plain values "
    "(dict, list, str, int, float, bool, None) or drop them; torch.save(ckpt, CLEAN_PATH); "
    "then pass CLEAN_PATH."
)


def refused_as_unsafe(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised from, torch's refusal to unpickle an object under
    ``weights_only=True`` (Lightning and timm pass it on as it is or wrapped)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return True
        # the chain Python prints: an explicit cause, else the error being handled
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return False


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects (importable names) a file would unpickle beyond tensors and plain
    values, read by torch without unpickling; empty where torch cannot tell (a foreign file)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def unsafe_file_error(
    key: str, path: str | os.PathLike[str], fix: str = RESAVE_CHECKPOINT
) -> CheckpointError:
    """The refusal of a file that ``torch.load(weights_only=True)`` would not read, for the
    config ``key`` that named it; ``fix`` says how to re-save a clean one."""
    p = Path(path).expanduser()
    names = _unsafe_globals(p)
    if names:
        what = f"holds Python objects besides tensors and plain values ({', '.join(names)})"
    else:
        what = (
            "does not hold tensors and plain values alone (it holds other Python objects, "
            "or is no file torch.save wrote)"
        )
    return CheckpointError(
        f"{key}={p} {what}: loading it could run code, so it is refused (covidqu reads "
        f"checkpoints and weights files with torch.load(weights_only=True) only). {fix}"
    )


@contextmanager
def refusing_unsafe(
    key: str, path: str | os.PathLike[str] | None, fix: str = RESAVE_CHECKPOINT
) -> Iterator[None]:
    """Within the block, torch's refusal to unpickle ``path`` becomes :func:`unsafe_file_error`
    (for the loads Lightning does itself, asked for ``weights_only=True``)."""
    try:
        yield
    except Exception as err:
        if path is None or not refused_as_unsafe(err):
            raise
        raise unsafe_file_error(key, path, fix) from err


def read_checkpoint(path: str | os.PathLike[str], key: str = "ckpt_path") -> dict[str, Any]:
    """The raw checkpoint dict, read with ``weights_only=True``; a clear error for a missing,
    foreign or unsafe file, naming it as the config ``key`` that gave it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"{key}={p} does not exist; pass a run's checkpoints/best.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # an unsafe, truncated or foreign file: say which
        if refused_as_unsafe(err):
            raise unsafe_file_error(key, p) from err
        raise CheckpointError(
            f"{key}={p} is not a readable checkpoint: {unreadable(p, err)}"
        ) from err
    if not isinstance(ckpt, dict) or "covidqu" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{key}={p} was not written by a covidqu run (no 'covidqu' recipe inside); "
            "pass a run's checkpoints/best.ckpt or last.ckpt"
        )
    return ckpt


def unreadable(path: Path, err: BaseException) -> str:
    """Why ``path`` could not be read, never empty: torch's own words, and the file's size (an
    empty or truncated file is what a full disk or a kill mid-write leaves)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    said = str(err).strip() or type(err).__name__
    return f"{said} ({size:,} bytes: truncated, or not a file torch.save wrote)"


def module_class(recipe: dict[str, Any]) -> type[CXRModule]:
    """The LightningModule class a checkpoint's recipe was written by: what its task may do is
    asked of it (:attr:`~covidqu.models.task.TaskContract.class_head`, ...)."""
    return get_class(recipe["module_class"])


def build_from_recipe(recipe: dict[str, Any], net: torch.nn.Module | None = None) -> CXRModule:
    """A module with freshly built network, loss and metrics as described by ``recipe``;
    ``net``: that network instead of the recipe's (an ensemble of such modules)."""
    if net is None:
        net_cfg = copy.deepcopy(recipe["net"])
        for key in WEIGHT_KEYS:
            if key in net_cfg:
                net_cfg[key] = None
        net = instantiate(net_cfg)
    loss = instantiate(recipe["loss"]) if recipe.get("loss") else None
    metrics = instantiate(recipe["metrics"])
    cls = module_class(recipe)
    kwargs = dict(recipe.get("module_kwargs") or {})
    inner = {k: v for k, v in recipe.items() if k != "module_class"}
    return cls(net=net, loss=loss, metrics=metrics, recipe=inner, **kwargs)


def load_module(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    key: str = "ckpt_path",
) -> CXRModule:
    """The trained module of a checkpoint, in eval mode, with its recipe in ``module.recipe``
    and the temperature of its calibration sidecar, if it has a current one
    (:func:`covidqu.models.calibration.read_temperature`), in ``module.temperature``; errors
    name the file as the config ``key`` that gave it."""
    ckpt = read_checkpoint(path, key)
    module = build_from_recipe(ckpt["covidqu"])
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    # Loss functions may carry buffers (class weights) that older recipes did not: tolerate
    # those, but never a network weight that does not fit.
    bad = [k for k in (*missing, *unexpected) if not k.startswith("loss_fn.")]
    if bad:
        raise CheckpointError(
            f"{key}={path}: its weights do not fit the network its recipe builds "
            f"({len(bad)} keys, e.g. {bad[:3]})"
        )
    module.temperature = read_temperature(path, ckpt["state_dict"], key)
    return module.to(map_location).eval()


def preprocessing(module: CXRModule) -> dict[str, Any]:
    """The data preprocessing a module was trained with (size, mean, std, target, subset)."""
    pre = module.recipe.get("preprocess")
    if not pre:
        raise CheckpointError("the checkpoint's recipe has no preprocessing section")
    return dict(pre)
