"""What ``train`` checks before it builds anything: its values, their combination, the output
folder (writable, no live run writing into it), the data tree (folders only), a weights file it
names, and the checkpoint it would resume from (:func:`check_resume`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from covidqu.errors import CheckpointError, ConfigError, UserError
from covidqu.runtime.checks import MISSING, check_output_dir, check_values, value_at
from covidqu.runtime.cli import user_errors
from covidqu.runtime.runlock import probe
from covidqu.train.synthetic import with_synthetic_defaults


def check(cfg: DictConfig, out_dir: Path, overrides: Iterable[str] | None = None) -> None:
    """``train``'s checks (see the module docstring)."""
    from hydra.utils import instantiate

    cfg = with_synthetic_defaults(cfg, overrides or [])
    check_values(cfg, "train")
    check_config(cfg)
    check_output_dir(out_dir, "hydra.run.dir")
    probe(out_dir)  # a live run writing there: refused before Hydra overwrites its .hydra/
    if cfg.data.get("root") not in (None, ""):
        with user_errors():
            datamodule = instantiate(cfg.data)
        datamodule.scan()  # lists folders only: the tree, not a pixel
    weights = value_at(cfg, "encoder.weights")
    if weights is not MISSING:
        from covidqu.models.weights import parse_weights

        parse_weights(weights)  # a weights file must exist
    check_transfer(cfg)
    check_tune(cfg)
    check_resume(cfg, out_dir)


def check_transfer(cfg: DictConfig) -> None:
    """``encoder.load_decoder=true`` needs a segmentation network and, in ``encoder.weights``,
    the covidqu checkpoint of one whose decoder fits (:mod:`covidqu.models.transfer`)."""
    if value_at(cfg, "encoder.load_decoder") is not True:
        return
    from covidqu.models.weights import parse_weights

    weights = value_at(cfg, "encoder.weights")
    builder = str(value_at(cfg, "model._target_"))
    if not builder.endswith("build_segmentation_model"):
        raise ConfigError(
            f"encoder.load_decoder=true needs a segmentation network with a decoder, but "
            f"task={value_at(cfg, 'task.name')} builds {builder.rsplit('.', 1)[-1]}: drop "
            "encoder.load_decoder, or train a segmentation task (task=lung, task=infection)"
        )
    source, _ = parse_weights(None if weights is MISSING else weights)
    if source != "file":
        raise ConfigError(
            f"encoder.load_decoder=true takes the decoder of a covidqu checkpoint, but "
            f"encoder.weights={'null' if weights is None else weights} is "
            f"{'no file' if source == 'named' else 'random initialisation'}: set "
            "encoder.weights=RUN/checkpoints/best.ckpt (a covidqu segmentation run), or drop "
            "encoder.load_decoder"
        )
    from covidqu.models.transfer import check_load_decoder

    check_load_decoder(weights, value_at(cfg, "data.target"), value_at(cfg, "model"))


def _device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for; ``None`` where only the machine tells
    (``auto``, ``-1``): the finder checks the trainer again then."""
    if isinstance(devices, str) and "," not in devices and devices.strip().isdigit():
        devices = int(devices)  # Lightning reads "2" as two devices, "0," as the device 0
    if isinstance(devices, int) and not isinstance(devices, bool):
        return None if devices == -1 else devices
    if isinstance(devices, str):
        ids = [p for p in devices.split(",") if p.strip()]
        return len(ids) if ids else None
    return len(devices) if isinstance(devices, list | tuple) else None


def check_tune(cfg: DictConfig) -> None:
    """``tune=lr``: a range of rates to try, one device (Lightning's learning-rate finder does
    not run distributed), and a run that trains steps (not ``trainer.fast_dev_run``)."""
    if value_at(cfg, "tune.name") != "lr":
        return
    low, high = value_at(cfg, "tune.min_lr"), value_at(cfg, "tune.max_lr")
    if low >= high:
        raise ConfigError(
            f"tune.min_lr={low} must be below tune.max_lr={high}: the finder raises the rate "
            "from one to the other, e.g. tune.min_lr=1e-7 tune.max_lr=1.0"
        )
    devices = _device_count(value_at(cfg, "trainer.devices"))
    nodes = value_at(cfg, "trainer.num_nodes")
    if (devices or 1) > 1 or (nodes not in (MISSING, None) and nodes > 1):
        raise ConfigError(
            f"tune=lr runs on one device, but trainer.devices={value_at(cfg, 'trainer.devices')} "
            f"and trainer.num_nodes={nodes}: Lightning's learning-rate finder does not support "
            "distributed training. Find the rate with trainer.devices=1 trainer.num_nodes=1 "
            "(e.g. trainer=single or trainer=cpu), then train on several devices with "
            "optimizer.lr=<the suggestion> and without tune=lr"
        )
    if value_at(cfg, "trainer.fast_dev_run") not in (False, 0, None, MISSING):
        raise ConfigError(
            "tune=lr does not run with trainer.fast_dev_run (Lightning skips the finder then): "
            "drop one of them"
        )


def check_config(cfg: DictConfig) -> None:
    """Refuse combinations that cannot work, before any data or model is built."""
    network = cfg.task.get("network")
    builder = str(cfg.model.get("_target_", ""))
    if network and builder != network.builder:
        raise ConfigError(
            f"task={cfg.task.name} needs {network.what}, but the model config builds "
            f"{builder.rsplit('.', 1)[-1]} ({builder}); use {network.choices}"
        )
    for key in (network or {}).get("requires") or []:  # model options the task's module reads
        if cfg.model.get(key) in (None, {}, []):
            raise ConfigError(
                f"task={cfg.task.name} needs model.{key} (set by conf/task/{cfg.task.name}.yaml), "
                f"but it is empty: remove the override of model.{key}, or choose another task"
            )
    check_loss(cfg)
    monitor = str(cfg.task.monitor)
    if not monitor.startswith(("val/", "train/")):
        raise ConfigError(f"task.monitor={monitor} must name a logged metric such as val/dice")
    if cfg.task.monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode must be min or max, got {cfg.task.monitor_mode}")


def _task_output(cfg: DictConfig) -> tuple[str, Any, Any, str]:
    """``(kind, mode, outputs, what)``: the task's output as a loss sees it, and in words."""
    kind, mode = str(value_at(cfg, "task.kind")), value_at(cfg, "task.mode")
    outputs = value_at(cfg, "task.num_outputs")
    if kind == "classification":
        return kind, mode, outputs, f"{outputs} classes per image"
    target = value_at(cfg, "data.target")
    if mode == "binary":
        return kind, mode, outputs, f"data.target={target}, a binary mask: one output channel"
    return kind, mode, outputs, f"data.target={target}, {outputs} classes per pixel"


def loss_fault(loss_cfg: Any, kind: str, mode: Any, outputs: Any) -> str | None:
    """Why the loss ``loss_cfg`` builds cannot score the task's output, or ``None`` when it can.

    The loss is built and run on a tiny batch of the task's logits and targets (a few hundred
    numbers): every refusal a loss makes, at construction or on its first batch, is then met
    here, before any data or network is built.
    """
    import torch
    from hydra.utils import instantiate

    try:
        loss = instantiate(loss_cfg)
        if kind == "classification":
            logits, target = torch.zeros(2, int(outputs)), torch.tensor([0, 1])
        elif mode == "binary":
            logits, target = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
        else:
            logits = torch.zeros(2, int(outputs), 8, 8)
            target = torch.zeros(2, 8, 8, dtype=torch.long)
        loss(logits, target)
    except Exception as err:  # the loss's own words (Hydra wraps a constructor's)
        cause = err.__cause__ if err.__cause__ is not None else err
        return str(cause).strip() or type(cause).__name__
    return None


def _losses_that_fit(kind: str, mode: Any, outputs: Any) -> list[str]:
    """The options of the loss group (``conf/loss/``) that fit the task, by name."""
    from covidqu.runtime.cli import CONF_DIR

    fits = []
    for path in sorted(Path(CONF_DIR, "loss").glob("*.yaml")):
        option = OmegaConf.create({"task": {"mode": mode}, "loss": OmegaConf.load(path)})
        if loss_fault(option.loss, kind, mode, outputs) is None:
            fits.append(path.stem)
    return fits


def _loss_choice() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("loss")
    except Exception:  # not under Hydra (an in-process caller)
        return None


def check_loss(cfg: DictConfig) -> None:
    """Refuse a loss that cannot score the task's output (``loss=ce`` on a binary mask,
    ``loss=bce`` on classes, a segmentation loss for ``task=classify``, class weights of
    another number of classes, ...), naming ``loss`` and the options that fit."""
    loss_cfg = cfg.get("loss")
    if not loss_cfg or "_target_" not in loss_cfg:
        return
    kind, mode, outputs, what = _task_output(cfg)
    fault = loss_fault(loss_cfg, kind, mode, outputs)
    if fault is None:
        return
    choice = _loss_choice()
    name = f"loss={choice}" if choice else f"the loss ({loss_cfg._target_})"
    fits = ", ".join(_losses_that_fit(kind, mode, outputs)) or "none of conf/loss/"
    raise ConfigError(
        f"{name} does not fit task={value_at(cfg, 'task.name')} ({what}): {fault}\n"
        f"Choose a loss that fits: loss={fits}"
    )


def _plain_model(model: Mapping[str, Any]) -> dict[str, Any]:
    from covidqu.models.checkpoint import WEIGHT_KEYS

    return {k: v for k, v in model.items() if k not in WEIGHT_KEYS}


def _differences(recipe: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    """How the run ``recipe`` was written by differs from ``cfg``: task, network, preprocessing,
    the folds validated on."""
    found: list[str] = []

    def compare(key: str, then: Any, now: Any) -> None:
        if then != now:
            found.append(f"{key}: {then!r} in the checkpoint, {now!r} now")

    compare("task.name", recipe.get("task", {}).get("name"), value_at(cfg, "task.name"))
    then_net = _plain_model(recipe.get("net") or {})
    now_net = _plain_model(value_at(cfg, "model") or {})
    for key in sorted(set(then_net) | set(now_net)):
        compare(f"model.{key}", then_net.get(key), now_net.get(key))
    pre = recipe.get("preprocess") or {}
    data = value_at(cfg, "data") or {}
    compare("data._target_", pre.get("datamodule"), data.get("_target_"))
    if data.get("target") is not None:
        compare("data.target", pre.get("target"), data.get("target"))
    for key in ("image_size", "mean", "std"):
        compare(f"data.{key}", pre.get(key), data.get(key))
    for key in ("num_folds", "fold", "fold_seed"):
        # Recorded since folds are: a checkpoint of an older covidqu has no such field, and its
        # split is unknown, not another one (None is a value: the official Train / Val).
        if key in pre and (key != "fold_seed" or pre.get("num_folds") is not None):
            compare(f"data.{key}", pre[key], data.get(key))
    # With ema, a checkpoint's state_dict is the average: resumed without ema, training would
    # go on from it as if it were the raw weights. A checkpoint older than the key had none.
    then_ema = recipe.get("ema") or {"enabled": False, "decay": None}
    now_ema = value_at(cfg, "ema") is True
    compare("ema", then_ema.get("enabled", False), now_ema)
    if now_ema and then_ema.get("enabled"):
        compare("ema_decay", then_ema.get("decay"), value_at(cfg, "ema_decay"))
    return found


#: How many differences a refused resume lists.
_SHOWN = 6


@dataclass
class Resume:
    """The checkpoint a run resumes from: its ``path``, the key that chose it (``ckpt_path`` or
    ``auto_resume``), its epoch and step, and the run folder's checkpoints passed over on the
    way, each with the reason."""

    path: Path
    why: str
    epoch: int | None = None
    step: int | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """One line for the log: what is resumed, and what was passed over and why."""
        where = f"epoch {self.epoch}, step {self.step}" if self.step is not None else "?"
        text = f"resuming from {self.path} ({where})"
        if self.skipped:
            passed = "; ".join(reason for _, reason in self.skipped)
            text += f", the newest checkpoint of the run that loads; passed over (kept): {passed}"
        return text


def _loaded(path: Path, why: str) -> Resume:
    from covidqu.models.checkpoint import read_checkpoint
    from covidqu.runtime.checkpoint_io import holds_training_state

    ckpt = read_checkpoint(path, key=why)
    if not holds_training_state(ckpt):  # best.ckpt: the weights, without the optimizer state
        raise CheckpointError(
            f"{why}={path} holds the weights only, without the optimizer and scheduler state a "
            "resume needs (best.ckpt keeps none): resume from the run's checkpoints/last.ckpt, "
            "or start a new run from these weights with encoder.weights="
            f"{path} encoder.load_decoder=true"
        )
    return Resume(path, why, ckpt.get("epoch"), ckpt.get("global_step"), [], ckpt["covidqu"])


def resume_candidate(cfg: DictConfig, out_dir: Path) -> Resume | None:
    """The checkpoint ``train`` would resume from, read (its recipe, epoch and step), if any.

    ``ckpt_path`` when given. Else, with ``auto_resume``, the newest state of the run folder
    that loads: ``checkpoints/last.ckpt`` (written after every epoch, and on an interrupt), or,
    where it does not load (a kill or a full disk mid-write left it empty or truncated), the
    readable checkpoint of the highest step among the others that hold the training state
    (per-epoch ones; not ``best.ckpt``, which keeps the weights alone). Files that do not load
    or cannot resume are passed over, with the reason, and never deleted; when none
    loads, a :class:`UserError` lists them all.
    """
    if cfg.get("ckpt_path"):
        return _loaded(Path(str(cfg.ckpt_path)).expanduser(), "ckpt_path")
    folder = out_dir / "checkpoints"
    if not cfg.get("auto_resume", True) or not folder.is_dir():
        return None
    last = folder / "last.ckpt"
    skipped: list[tuple[Path, str]] = []
    found: Resume | None = None
    for path in [last, *sorted(p for p in folder.glob("*.ckpt") if p != last)]:
        if not path.is_file():
            continue
        try:
            candidate = _loaded(path, "auto_resume")
        except UserError as err:  # "auto_resume=PATH is not a readable checkpoint: ..."
            skipped.append((path, str(err)))
            continue
        if path == last:
            found = candidate
            break
        newer = found is None or (candidate.step or -1, path.stat().st_mtime) > (
            found.step or -1,
            found.path.stat().st_mtime,
        )
        found = candidate if newer else found
    if found is None and skipped:
        listed = "\n  ".join(reason for _, reason in skipped)
        raise CheckpointError(
            f"{out_dir} holds no checkpoint that loads, so this run cannot resume:\n  {listed}\n"
            "They are kept as they are. Set auto_resume=false to train afresh in this folder, or "
            "choose another hydra.run.dir."
        )
    if found is not None:
        found.skipped = skipped
    return found


def check_resume(cfg: DictConfig, out_dir: Path) -> Resume | None:
    """The checkpoint to resume from, after checking it belongs to this config.

    A run folder's ``last.ckpt`` written by another task, network or preprocessing would fail
    deep inside Lightning with a state-dict error, or worse, resume into the wrong run: refuse
    it, naming what differs and the two ways out, before anything in that folder is touched.
    """
    found = resume_candidate(cfg, out_dir)
    if found is None:
        return None
    path, why = found.path, found.why
    differences = _differences(found.recipe, cfg)
    if not differences:
        return found
    shown = differences[:_SHOWN]  # another task differs in every model key: the first few say it
    if len(differences) > _SHOWN:
        shown.append(f"... and {len(differences) - _SHOWN} more")
    listed = "\n  ".join(shown)
    if why == "ckpt_path":
        raise ConfigError(
            f"ckpt_path={path} was written by another config, so this run cannot resume from "
            f"it:\n  {listed}\nResume it with the config it was trained with, or drop ckpt_path."
        )
    raise ConfigError(
        f"{out_dir} holds a run of another config: its checkpoint {path.name} was written with\n"
        f"  {listed}\nNothing in that folder was changed. Start this run in another folder "
        f"(hydra.run.dir=NEW_FOLDER), or start afresh in this one with auto_resume=false (its "
        "checkpoints will then be replaced)."
    )
