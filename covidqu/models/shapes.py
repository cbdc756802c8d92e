"""One check of segmentation logits against their target, for the losses and metrics alike.

Both receive the network's raw logits and the batch's ``mask`` (see :mod:`covidqu.constants`);
a mismatch between the two (a binary loss on a multi-class target, a float mask where class
indices belong, ...) is a configuration error, and the message names the key that fixes it.
"""

from __future__ import annotations

from torch import Tensor

from covidqu.constants import MODES, TARGETS


def _targets(mode: str) -> str:
    names = [t.name for t in TARGETS.values() if t.mode == mode]
    return " or ".join(f"data.target={n}" for n in names)


def check_mode(mode: str, key: str) -> str:
    """``mode`` if it is one of :data:`~covidqu.constants.MODES`, else an error naming ``key``."""
    if mode not in MODES:
        raise ValueError(
            f"{key}={mode!r} is not valid: use 'binary' (one sigmoid channel, "
            f"{_targets('binary')}) or 'multiclass' (softmax over channels, "
            f"{_targets('multiclass')}). The configs set it to ${{task.mode}}, so it normally "
            "follows the task."
        )
    return mode


def check_segmentation(
    logits: Tensor,
    target: Tensor,
    mode: str,
    *,
    who: str,
    key: str,
    num_classes: int | None = None,
    also: str = "",
) -> tuple[Tensor, Tensor]:
    """Validate ``logits`` (B x C x H x W) against ``target``; return the target in layout.

    Binary: one channel and a B x 1 x H x W target (B x H x W is accepted). Multiclass: C >= 2
    channels (``num_classes`` of them when given) and int64 class indices B x H x W in
    ``[0, C)``. ``who`` opens every message (``loss=dice``), ``key`` is the config key of the
    mode (``loss.mode``); ``also`` names other accepted logits in the shape error.
    """
    shape = tuple(logits.shape)
    if logits.dim() != 4:
        raise ValueError(f"{who}: logits must be B x C x H x W{also}; got shape {shape}")
    b, c, h, w = shape
    follows = f"({key} follows ${{task.mode}})"
    if mode == "binary":
        if c != 1:
            raise ValueError(
                f"{who} with {key}=binary expects logits B x 1 x H x W but got {c} channels "
                f"{shape}. A multi-class target ({_targets('multiclass')}) needs "
                f"{key}=multiclass: check data.target and the task {follows}."
            )
        if target.dim() == 3:
            target = target.unsqueeze(1)
        if tuple(target.shape) != (b, 1, h, w):
            raise ValueError(
                f"{who} with {key}=binary expects a target B x 1 x H x W = {(b, 1, h, w)} "
                f"matching the logits; got {tuple(target.shape)}. Check data.target and the "
                f"task {follows}."
            )
        return logits, target
    if c < 2:
        raise ValueError(
            f"{who} with {key}=multiclass expects logits with C >= 2 channels; got {shape}. A "
            f"binary mask target ({_targets('binary')}) needs {key}=binary {follows}."
        )
    if num_classes is not None and c != num_classes:
        raise ValueError(
            f"{who} with {key}=multiclass and num_classes={num_classes} got logits with {c} "
            f"channels {shape}"
        )
    if target.dim() == 4 and target.shape[1] == 1:
        target = target.squeeze(1)
    if target.is_floating_point():
        raise ValueError(
            f"{who} with {key}=multiclass expects int64 class indices B x H x W, got a "
            f"{target.dtype} target {tuple(target.shape)}; a float 0/1 mask is a binary target "
            f"and needs {key}=binary (check data.target and the task)."
        )
    if tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"{who} with {key}=multiclass expects a target B x H x W = {(b, h, w)} matching "
            f"the logits {shape}; got {tuple(target.shape)}"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ValueError(
            f"{who}: multiclass target values must be in [0, {c}), got "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    return logits, target.long()
