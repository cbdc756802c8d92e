"""What the segmentation and classification LightningModules share.

A module receives built objects (network, loss, metric set, optimizer and scheduler partials),
never names to resolve. It also carries a *recipe*: the plain-dict configs of the network, loss
and metrics and the data preprocessing (size, normalisation, target). The recipe is written into
every checkpoint, so :func:`covidqu.models.checkpoint.load_module` rebuilds the network and its
preprocessing from the checkpoint alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from covidqu.models.kept import KeptOverlays, gather_rows
from covidqu.models.schedulers import Resumed, RunSteps, StepPlan, parameters, plan_steps
from covidqu.models.task import TaskContract
from covidqu.models.tta import check_tta, tta_probabilities
from covidqu.resolvers import to_plain

STAGES = ("train", "val", "test")


class CXRModule(TaskContract, pl.LightningModule):
    """Shared training loop, logging, optimisation and checkpoint recipe; what each task
    gives the commands is :class:`~covidqu.models.task.TaskContract`'s.

    Args:
        net: the network; ``net(image)`` gives logits.
        loss: ``loss(logits, target)`` -> scalar; ``None`` when only evaluating.
        metrics: a metric set (a :class:`torchmetrics.Metric` whose ``compute`` returns a dict
            of named values); one copy each is kept for train, val and test.
        optimizer: a partial taking the parameters (``_partial_: true`` in config).
        scheduler: a partial taking the optimizer (and ``total_steps`` if its signature has
            it), or ``None``.
        scheduler_interval: ``step`` or ``epoch``.
        scheduler_monitor: the metric a plateau scheduler watches.
        channels_last: run the network in channels-last memory format (faster convolutions on
            recent GPUs with mixed precision): ``True`` or ``False`` force it; ``None`` turns it
            on where the module runs on a CUDA device and off elsewhere, decided once the device
            is known (:func:`channels_last_on`).
        compile: compile the network with ``torch.compile`` at fit start.
        recipe: plain-dict configs needed to rebuild the network and its preprocessing; saved
            in every checkpoint.
    """

    #: Key of the batch that holds the target of the loss and metrics.
    target_key = "mask"

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module | None,
        metrics: Metric,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler.interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        self.net = net
        self.loss_fn = loss
        # One copy per stage (train_metrics, val_metrics, test_metrics), registered as children
        # so they move with the module and sync across processes.
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", metrics.clone())
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        if not (channels_last is None or isinstance(channels_last, bool)):
            raise ValueError(
                f"module.channels_last must be true, false or null (on a CUDA device only), "
                f"got {channels_last!r}"
            )
        #: ``module.channels_last`` as given; :attr:`runs_channels_last` is what the network does.
        self.channels_last = channels_last
        #: Whether the network is in channels-last memory format now (as built, it is not);
        #: under ``None`` it follows the device once that is known (:meth:`follow_device`).
        self.runs_channels_last = False
        self.compile_net = compile
        self.recipe: dict[str, Any] = dict(to_plain(recipe or {}))
        #: Per-image rows of the last test run (id, class, scores), for ``per_image.csv``.
        self.test_records: list[dict[str, Any]] = []
        #: How many test images to keep overlays of: the split's first, and its worst (ranked
        #: as the report's gallery ranks them); after a test run, :attr:`overlays` holds them.
        self.keep_overlays = 0
        self.keep_worst = 0
        self.overlays: list[dict[str, Any]] = []
        self._kept = KeptOverlays()
        #: Test-time augmentation of the test step and of :meth:`predict_probabilities` (set by
        #: eval, predict and analyze; never saved in a checkpoint, never used in training).
        self.tta = "none"
        #: What evaluation and prediction divide the logits by before the probabilities (a
        #: fitted temperature, see :mod:`covidqu.models.calibration`; set by ``load_module``
        #: from the checkpoint's sidecar, never saved in a checkpoint, never used in training).
        self.temperature = 1.0
        #: The steps a step-counted schedule was built for (saved in checkpoints); what the
        #: checkpoint resumed from said of its own (read before the schedule is built).
        self.step_plan: StepPlan | None = None
        self._resumed: Resumed | None = None
        self.save_hyperparameters(
            ignore=["net", "loss", "metrics", "optimizer", "scheduler", "recipe"]
        )
        if channels_last:
            self.follow_device(self.device)

    # -- forward ---------------------------------------------------------------------------------

    def follow_device(self, device: torch.device) -> bool:
        """Put the network in the memory format ``module.channels_last`` asks for on ``device``
        (:func:`channels_last_on`), converting it where it is not; whether that is channels-last.

        Called at ``setup``, before the strategy moves the module and wraps it for DDP, and by
        every forward, where it changes nothing unless the module moved to another kind of
        device outside a Trainer (``predict`` and ``analyze`` load a checkpoint on the CPU, then
        move it).
        """
        wanted = channels_last_on(self.channels_last, device)
        if wanted != self.runs_channels_last:
            fmt = torch.channels_last if wanted else torch.contiguous_format
            self.net = self.net.to(memory_format=fmt)
            self.runs_channels_last = wanted
        return wanted

    def forward(self, image: Tensor) -> Tensor:
        if self.follow_device(image.device) and image.dim() == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class or pixel probabilities from logits (sigmoid for one channel, else softmax)."""
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    def logits_of(self, probabilities: Tensor) -> Tensor:
        """Logits whose :meth:`probabilities` are ``probabilities`` (logit for one channel, log
        for softmax), clamped off 0 and 1 so a loss on them stays finite: with them, the test
        step's metrics, rows and overlays, which read logits, score averaged probabilities."""
        if probabilities.shape[1] == 1:
            return torch.logit(probabilities, eps=1e-6)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))

    @property
    def tta(self) -> str:
        """The test-time augmentation: ``none``, ``flip`` or ``flip_scale`` (see
        :mod:`covidqu.models.tta`)."""
        return self._tta

    @tta.setter
    def tta(self, mode: str) -> None:
        self._tta = check_tta(mode)

    def calibrated(self, image: Tensor) -> Tensor:
        """The network's logits over :attr:`temperature`: what evaluation and prediction read."""
        logits = self(image)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def predict_probabilities(self, image: Tensor) -> Tensor:
        """The probabilities of a batch as evaluation and prediction give them: of the
        :meth:`calibrated` logits, averaged over the test-time augmentation :attr:`tta`."""
        return tta_probabilities(self.calibrated, self.probabilities, image, self.tta)

    def test_logits(self, image: Tensor) -> Tensor:
        """The logits the test step scores: the :meth:`calibrated` network's, or under
        :attr:`tta` those of the averaged probabilities (:meth:`logits_of`)."""
        if self.tta == "none":
            return self.calibrated(image)
        return self.logits_of(self.predict_probabilities(image))

    def stage_metrics(self, stage: str) -> Metric:
        """The metric set of ``stage`` (``train``, ``val`` or ``test``)."""
        return getattr(self, f"{stage}_metrics")

    # -- steps -----------------------------------------------------------------------------------

    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[Tensor, Tensor | None]:
        # test-time augmentation in the test step only: training and validation see the network
        logits = self.test_logits(batch["image"]) if stage == "test" else self(batch["image"])
        loss, parts = self.loss_of(logits, batch) if self.loss_fn is not None else (None, {})
        bs = batch["image"].shape[0]
        if loss is not None:
            self.log(
                f"{stage}/loss",
                loss,
                on_step=stage == "train",
                on_epoch=True,
                prog_bar=True,
                batch_size=bs,
                sync_dist=stage != "train",
            )
            for name, value in parts.items():
                self.log(
                    f"{stage}/loss_{name}",
                    value,
                    on_epoch=True,
                    batch_size=bs,
                    sync_dist=stage != "train",
                )
        self.update_metrics(stage, detached(logits), batch)
        return logits, loss

    def loss_of(
        self, logits: Tensor, batch: Mapping[str, Any]
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """The loss of a batch, and its named parts to log as ``<stage>/loss_<name>`` (those a
        :class:`~covidqu.models.losses.WeightedSum` remembers)."""
        loss = self.loss_fn(logits, batch[self.target_key])
        return loss, dict(getattr(self.loss_fn, "last", None) or {})

    def update_metrics(self, stage: str, logits: Tensor, batch: Mapping[str, Any]) -> None:
        """Add a batch to the metrics of ``stage``: the logits against the batch's target."""
        self.stage_metrics(stage).update(logits, batch[self.target_key])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        _, loss = self._step(batch, "train")
        if loss is None:
            raise RuntimeError("training needs a loss: the module was built without one")
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at epoch {self.current_epoch}, batch "
                f"{batch_idx}; lower optimizer.lr, enable trainer.gradient_clip_val, or check "
                "the data (python -m covidqu.data inspect ROOT --verify)"
            )
        return loss

    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        # A None batch (no readable sample): Lightning skips it in training, not in evaluation.
        if batch is None:
            return
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        logits = detached(self._step(batch, "test")[0])
        first = len(self.test_records)
        self.record_test_batch(batch, logits)
        rows = self.test_records[first:]
        self._kept.offer(rows, lambda at: self.overlay_items(batch, logits, at))

    @property
    def normalisation(self) -> tuple[float, float]:
        """The ``(mean, std)`` the inputs were normalised with (from the recipe)."""
        pre = self.recipe.get("preprocess", {})
        return float(pre.get("mean", 0.0)), float(pre.get("std", 1.0))

    # -- epoch ends ------------------------------------------------------------------------------

    def _log_metrics(self, stage: str) -> None:
        metric = self.stage_metrics(stage)
        values = metric.compute()
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items()},
            prog_bar=False,
            sync_dist=False,  # a torchmetrics Metric has already reduced across processes
        )
        self.on_metrics_computed(stage, metric, values)
        metric.reset()

    def on_metrics_computed(self, stage: str, metric: Metric, values: dict[str, Tensor]) -> None:
        """Hook for subclasses (e.g. keep a confusion matrix) before the metric is reset."""

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.test_records = []
        self.overlays = []
        self._kept = KeptOverlays(self.keep_overlays, self.keep_worst)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self.test_records = gather_rows(self.test_records)
        self.overlays = self._kept.gathered()

    # -- optimisation ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Lightning sets the module's device to the strategy's root device before this hook
        self.follow_device(self.device)
        if self.compile_net and stage == "fit":
            self.net = torch.compile(self.net)

    @property
    def lr(self) -> float | None:
        """``optimizer.lr``: the ``lr`` of the optimizer partial, which Lightning's LR finder
        reads and sets (``Tuner.lr_find(update_attr=True)``); ``None`` without one."""
        return (getattr(self.optimizer_factory, "keywords", None) or {}).get("lr")

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer_factory = functools.partial(self.optimizer_factory, lr=float(value))

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("training needs an optimizer: the module was built without one")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        if "total_steps" in parameters(self.scheduler_factory):
            # Before the checkpoint's scheduler state is restored and before the first step: a
            # resume that changed the run's length is rebuilt or refused here, per schedule.
            settings = (self.recipe.get("schedule") or {}).get("settings")
            run = RunSteps.of(self.trainer)
            self.step_plan = plan_steps(self.scheduler_factory, run, self._resumed, settings)
            kwargs.update(self.step_plan.factory_kwargs())
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if self.scheduler_monitor:
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["covidqu"] = {
            **self.recipe,
            "module_class": f"{type(self).__module__}.{type(self).__qualname__}",
        }
        if self.step_plan is not None:
            schedule = {**(self.recipe.get("schedule") or {}), "plan": asdict(self.step_plan)}
            checkpoint["covidqu"]["schedule"] = schedule

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "covidqu" in checkpoint and not self.recipe:
            self.recipe = {k: v for k, v in checkpoint["covidqu"].items() if k != "module_class"}
        self._resumed = Resumed.of(checkpoint)  # Lightning calls this before configure_optimizers


def channels_last_on(setting: bool | None, device: torch.device | str) -> bool:
    """Whether a network on ``device`` runs in channels-last memory format: ``setting``
    (``module.channels_last``) where it is ``True`` or ``False``; for ``None``, on a CUDA device
    only, where convolutions in mixed precision are faster in it (on a CPU they are often
    slower)."""
    if setting is None:
        return torch.device(device).type == "cuda"
    return bool(setting)


def detached(outputs: Any) -> Any:
    """A network's output detached from the graph: a tensor, or each of a tuple of them (a
    network with a classification head gives masks and class logits)."""
    if isinstance(outputs, tuple):
        return tuple(o.detach() for o in outputs)
    return outputs.detach()
