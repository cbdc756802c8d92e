"""Grad-CAM heatmaps of a class head: what ``explain=gradcam`` of ``predict`` and ``eval`` draws.

pytorch-grad-cam (pip ``grad-cam``) computes the maps (its ``GradCAM``) and lays them over the
image (its ``show_cam_on_image``). What it cannot know is said here:

- which output is the class head's: the task module's
  :meth:`~covidqu.models.task.TaskContract.class_scores` (a multitask network gives masks first);
- which layer to explain (:func:`find_target_layer`): the deepest feature map the class head
  reads, where it is more than one pixel (at a tiny input the last stage is 1 x 1, which
  cannot show where anything is, so the stage before it is explained); for a vision
  transformer (timm's, ``model=vit``), the input of its last block's attention, whose patch
  tokens are laid back on their grid (:func:`find_token_layer`): the class token reads them
  there, and no later layer passes patch tokens to the head;
- that gradients are needed where ``predict`` and ``eval`` run under ``torch.inference_mode``:
  :meth:`GradCam.__call__` turns them on for itself alone.

The class explained is the class the command predicts (test-time augmentation and temperature
included); the map is of the network's own forward pass on the image as given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from covidqu.errors import ConfigError
from covidqu.models.base import CXRModule

#: The values of ``explain``.
EXPLAIN_MODES = ("none", "gradcam")


def check_explain_mode(value: Any) -> str:
    """``explain`` as given, refused (naming the key and its values) where it is not one."""
    if value not in EXPLAIN_MODES:
        raise ConfigError(
            f"explain={value!r} is not one of {', '.join(EXPLAIN_MODES)}: explain=gradcam "
            "writes a Grad-CAM heatmap of the predicted class beside each image; explain=none "
            "(the default) writes none"
        )
    return value


def check_explain(value: Any, ckpt_path: Any, module_cls: type[CXRModule], task: Any) -> None:
    """Refuse ``explain=gradcam`` before anything is loaded where it cannot work: on an ensemble
    (its members' maps are of different networks) or on a task without a class head
    (:attr:`~covidqu.models.task.TaskContract.explain_refusal` of the checkpoint's module class)."""
    from covidqu.models.ensemble import is_ensemble

    if check_explain_mode(value) == "none":
        return
    if is_ensemble(ckpt_path):
        raise ConfigError(
            f"explain=gradcam explains one network, and ckpt_path={ckpt_path} lists several: "
            "explain each member on its own (ckpt_path=A.ckpt explain=gradcam), or drop "
            "explain=gradcam"
        )
    refusal = module_cls.explain_refusal
    if refusal is not None:
        raise ConfigError(
            f"explain=gradcam shows where a class head looked for the class it predicts, and "
            f"ckpt_path={ckpt_path} is a task={task} model ({refusal}): drop explain=gradcam "
            "(explain=none), or give a checkpoint of task=classify or task=multitask"
        )


def eager(net: nn.Module) -> nn.Module:
    """The network itself where ``torch.compile`` wrapped it: hooks reach its eager modules
    only (``_orig_mod`` is where torch's compiled wrapper keeps it)."""
    return getattr(net, "_orig_mod", net)


def _stage_maps(net: nn.Module, x: Tensor, outputs: dict[str, Any]) -> list[Any]:
    """The feature maps of the network's encoder or backbone, shallow to deep; the class head
    reads the last. ``outputs``: each named module's output of that pass, filled by hooks."""
    if isinstance(getattr(net, "encoder", None), nn.Module):  # smp: the head reads the last
        return list(net.encoder(x))
    if callable(getattr(net, "forward_features", None)):  # timm: its stages, then the features
        final = net.forward_features(x)
        # timm says how many channels each stage has: a map whose dim 1 is not that count is
        # channels-last (B x H x W x C, as a Swin transformer's), which Grad-CAM cannot weigh
        infos = getattr(net, "feature_info", None) or []
        found = [(outputs.get(i.get("module")), i.get("num_chs")) for i in infos]
        stages = [out for out, channels in found if _channels_first(out, channels)]
        return [*stages, final if _channels_first(final, net.num_features) else None]
    raise ConfigError(
        f"explain=gradcam finds the layer to explain in segmentation-models-pytorch and timm "
        f"networks, and this checkpoint's network is a {type(net).__name__}: drop "
        "explain=gradcam"
    )


def _channels_first(x: Any, channels: int | None) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == channels


def find_target_layer(net: nn.Module, x: Tensor) -> tuple[str, nn.Module]:
    """The name and module of the convolutional layer Grad-CAM explains (see the module
    docstring), found by one pass of ``x`` through the network; a :class:`ConfigError` where
    there is none (tokens, an input too small). Vision transformers: :func:`find_token_layer`."""
    net = eager(net)
    names = {m: name for name, m in net.named_modules() if name}
    calls: Counter[str] = Counter()
    done: list[tuple[str, Any]] = []  # (name, output) as each module's forward ends
    outputs: dict[str, Any] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        name = names[module]
        calls[name] += 1
        done.append((name, output))
        outputs[name] = output

    handles = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad():
            maps = _stage_maps(net, x, outputs)
    finally:
        for handle in handles:
            handle.remove()
    last = maps[-1] if maps else None
    if not (isinstance(last, Tensor) and last.dim() == 4):
        raise ConfigError(
            "explain=gradcam explains a convolutional feature map (B x C x H x W), and this "
            "network's class head reads other features (channels-last maps, or tokens of a "
            "transformer other than timm's vision transformer): drop explain=gradcam, or "
            "explain a convolutional network (e.g. model=classifier encoder=resnet34) or "
            "model=vit"
        )
    wide = [m for m in maps if isinstance(m, Tensor) and m.dim() == 4 and m.shape[-2:].numel() > 1]
    if not wide:
        raise ConfigError(
            f"explain=gradcam: every feature map of this network is 1 x 1 at its input size "
            f"{tuple(x.shape[-2:])}, which shows no place: explain a model trained on larger "
            "images (data.image_size)"
        )
    # a module called once (a shared activation would give Grad-CAM several maps); the
    # outermost of those that return the map ends last
    found = [name for name, out in done if out is wide[-1] and calls[name] == 1]
    if not found:
        raise ConfigError(
            "explain=gradcam: no layer of this network returns the feature map its class head "
            "reads (its encoder makes it outside any layer, as one that reshapes a "
            "transformer's tokens does), so Grad-CAM cannot hook it: drop explain=gradcam, or "
            "explain a convolutional encoder (e.g. encoder=resnet34)"
        )
    return found[-1], net.get_submodule(found[-1])


def find_token_layer(
    net: nn.Module, x: Tensor
) -> tuple[str, nn.Module, Callable[[Tensor], Tensor]] | None:
    """For a timm vision transformer, the layer Grad-CAM explains (the norm before its last
    block's attention) and how that layer's tokens, ``B x (prefix + h * w) x C``, become maps
    ``B x C x h x w`` (the class and register tokens left out); checked by one pass of ``x``.
    ``None`` for a network of another kind."""
    net = eager(net)
    blocks, embed = getattr(net, "blocks", None), getattr(net, "patch_embed", None)
    prefix = getattr(net, "num_prefix_tokens", None)
    if not (isinstance(blocks, nn.Sequential) and len(blocks) and prefix is not None):
        return None
    norm, patch = getattr(blocks[-1], "norm1", None), getattr(embed, "patch_size", None)
    if not isinstance(norm, nn.Module) or patch is None:
        return None
    grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    seen: list[tuple[int, ...]] = []
    handle = norm.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0][1] != int(prefix) + grid[0] * grid[1]:
        return None  # not tokens on this grid: find_target_layer says why it cannot explain it
    if grid[0] * grid[1] < 2:
        raise ConfigError(
            f"explain=gradcam: this vision transformer sees its input {tuple(x.shape[-2:])} as "
            f"one patch, which shows no place: explain a model trained on larger images "
            "(data.image_size)"
        )

    def to_maps(tokens: Tensor) -> Tensor:
        patches = tokens[:, int(prefix) :]
        return patches.reshape(patches.shape[0], *grid, patches.shape[-1]).permute(0, 3, 1, 2)

    name = next(n for n, m in net.named_modules() if m is norm)
    return name, norm, to_maps


class ClassScores(nn.Module):
    """A module's class logits alone, ``B x classes``: the one output GradCAM takes."""

    def __init__(self, module: CXRModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if self.module.follow_device(x.device):  # as CXRModule.forward does
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module.class_scores(eager(self.module.net)(x))


class GradCam:
    """Grad-CAM of a module's class head; the layer is found once, here, by a pass of a blank
    input of the checkpoint's size, so a network that cannot be explained is refused before
    any image is read or written.

    Args:
        module: a loaded module whose class has no ``explain_refusal``.
        image_size: the network's input side, or ``[height, width]``.
        in_channels: the network's input channels.
    """

    def __init__(self, module: CXRModule, image_size: Any, in_channels: int = 1) -> None:
        self.module = module
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        device = next(module.parameters()).device
        probe = torch.zeros(1, int(in_channels), int(h), int(w), device=device)
        if module.runs_channels_last:
            probe = probe.contiguous(memory_format=torch.channels_last)
        #: How the layer's output becomes ``B x C x h x w`` maps, where it is tokens (a ViT).
        self.reshape: Callable[[Tensor], Tensor] | None = None
        tokens = find_token_layer(module.net, probe)
        if tokens is not None:
            self.layer_name, self.layer, self.reshape = tokens
        else:
            self.layer_name, self.layer = find_target_layer(module.net, probe)

    def __call__(self, x: Tensor, classes: Sequence[int]) -> np.ndarray:
        """``B x H x W`` maps in [0, 1] at the input's size, of ``classes`` (one per image)."""
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        with torch.inference_mode(False), torch.enable_grad():
            # a tensor made under inference_mode cannot enter autograd; its copy made here can
            x = x.detach().clone()
            cam = GradCAM(
                model=ClassScores(self.module),
                target_layers=[self.layer],
                reshape_transform=self.reshape,
            )
            try:
                return cam(input_tensor=x, targets=targets)
            finally:
                # not its context manager: its __exit__ swallows an IndexError
                cam.activations_and_grads.release()
                self.module.zero_grad(set_to_none=True)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """A BGR picture of a 2-D uint8 ``image`` under ``heatmap`` (in [0, 1], of any size:
    resized to the image's), by pytorch-grad-cam's own overlay."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image.shape[:2]
    heat = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    return show_cam_on_image(bgr.astype(np.float32) / 255.0, np.clip(heat, 0, 1), use_rgb=False)


def explained_classes(module: CXRModule, probabilities: Any) -> list[int]:
    """The class each image of a batch is predicted to be, from the module's probabilities (a
    tensor or, for two outputs, a pair): the class Grad-CAM explains."""
    return module.class_scores(probabilities).argmax(dim=1).tolist()


def gradcam_for(module: CXRModule, explain: str, pre: dict[str, Any]) -> GradCam | None:
    """A :class:`GradCam` of ``module`` for ``explain=gradcam``, ``None`` for ``explain=none``;
    ``pre``: the checkpoint's preprocessing (its input size and channels)."""
    if check_explain_mode(explain) == "none":
        return None
    return GradCam(module, pre["image_size"], int(pre.get("in_channels", 1)))
