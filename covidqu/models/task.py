"""What the commands ask of a task's module, and nothing else: the one place that lists what a
new task implements (docs/extending.md).

``train``, ``eval``, ``predict``, ``analyze``, ``export`` and ``report`` run any task through
these, never branching on a task's name: the class attributes say what a command may do with
the task (each refusal is the reason a command gives, or ``None``), the methods what a test run,
a prediction or an export writes for it. :class:`~covidqu.models.base.CXRModule` takes them in
beside its training loop; the defaults here are those of a task that has none of the thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from torch import Tensor


class TaskContract:
    """What a task's module gives the commands (see the module's docstring)."""

    # What the commands may do with a task's model, asked of its class (a checkpoint's recipe
    # names it: :func:`covidqu.models.checkpoint.module_class`).

    #: Why ``eval calibrate=true`` cannot fit a temperature to this task's outputs; ``None``
    #: where it can (its outputs are one tensor of class logits).
    calibration_refusal: ClassVar[str | None] = "it has no class logits"
    #: Why ``export`` cannot write this task's network as a file of one output (see
    #: :meth:`export_output`); ``None`` where it can.
    export_refusal: ClassVar[str | None] = None
    #: Whether the network also gives each image's class probabilities beside its pixel ones
    #: (a classification head): ``analyze detect.score=classifier|mean`` needs them.
    class_head: ClassVar[bool] = False
    #: Why ``explain=gradcam`` (``predict``, ``eval``) cannot explain this task's prediction;
    #: ``None`` where it can (a class head: :meth:`class_scores`).
    explain_refusal: ClassVar[str | None] = "it predicts masks, not a class: it has no class head"

    def record_test_batch(self, batch: Mapping[str, Any], logits: Tensor) -> None:
        """Append this batch's rows to :attr:`test_records`, one per image in batch order."""
        raise NotImplementedError

    def overlay_items(
        self, batch: Mapping[str, Any], outputs: Any, at: list[int]
    ) -> list[dict[str, Any]]:
        """What :meth:`render_overlay` needs of the batch's images at positions ``at`` given
        the network's (detached) outputs for the batch: on the CPU, each with its ``id``."""
        raise NotImplementedError

    def render_overlay(self, item: Mapping[str, Any]) -> np.ndarray:
        """A BGR picture of one item kept in :attr:`overlays`."""
        raise NotImplementedError

    def test_tables(self) -> dict[str, list[dict[str, Any]]]:
        """Tables of the last test run besides the per-image rows, by file stem."""
        return {}

    def confusion_matrix(self, stage: str) -> Tensor | None:
        """The confusion matrix of the last ``val`` / ``test`` epoch, where the task has one."""
        return None

    def test_reliability(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(confidence, correct)`` per image of the last test run, for a reliability
        diagram, where the task's output is a confidence; ``None`` by default."""
        return None

    def media_panels(self, batch: Mapping[str, Any], n: int) -> list[tuple[str, np.ndarray]]:
        """Up to ``n`` captioned BGR pictures of a validation batch for an experiment tracker;
        none by default."""
        return []

    def predict_outputs(
        self, image: np.ndarray, probabilities: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What ``predict`` writes for one input image (2-D uint8, at its own size) given the
        network's probabilities for it: the row's columns, and pictures by file suffix."""
        raise NotImplementedError

    def class_scores(self, outputs: Any) -> Tensor:
        """The class head's part, ``B x classes``, of the network's outputs or of their
        probabilities (what ``explain=gradcam`` explains); only where :attr:`explain_refusal`
        is ``None``."""
        raise NotImplementedError(f"{type(self).__name__}: {self.explain_refusal}")

    def export_output(self, height: int, width: int) -> dict[str, Any]:
        """What the exported network's one output is, for the metadata inside the file: its
        shape, activation and class names (:mod:`covidqu.export.run`)."""
        raise NotImplementedError


def logits_output(names: Sequence[str], shape: Sequence[Any]) -> dict[str, Any]:
    """An exported output of logits over ``names`` (sigmoid for one, else softmax), of
    ``shape``: what :meth:`TaskContract.export_output` describes."""
    return {
        "name": "logits",
        "kind": "logits",
        "shape": list(shape),
        "activation": "sigmoid" if len(names) == 1 else "softmax over dim 1",
        "class_names": list(names),
    }
