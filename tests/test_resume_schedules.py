"""A run resumed with another length keeps its learning-rate schedule sound, and a resume into
another split is refused.

A step-counted schedule is built for the optimizer steps of the whole run. When a resumed run
ends at another step (``trainer.max_epochs``, ``data.batch_size``, the number of processes
changed), ``warmup_cosine`` is rebuilt from the step reached, and ``one_cycle`` is refused before
the first step, naming the key and both values. A resume into another fold is refused too.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pytest
import torch

from covidqu.errors import ConfigError
from covidqu.models.schedulers import (
    Resumed,
    RunSteps,
    StepPlan,
    one_cycle,
    plan_steps,
    warmup_cosine,
)
from covidqu.train.checks import check_resume
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "test=false",
]


def overrides(root: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", *SHORT, "logger=csv", *extra]


def run_of(epochs: int, per_epoch: int = 10, world_size: int = 1) -> RunSteps:
    """A trainer's steps: ``epochs`` of ``per_epoch`` optimizer steps."""
    return RunSteps(epochs * per_epoch, per_epoch, world_size, epochs, -1)


def saved(plan: StepPlan, step: int, settings: dict, state: dict | None = None) -> Resumed:
    """What a checkpoint written at ``step`` by a run planned as ``plan`` says."""
    return Resumed(step, asdict(plan), settings, state or {})


def factor_of(factory, plan: StepPlan):
    """The schedule's multiplier of the base rate, by optimizer step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return factory(optimizer=optimizer, **plan.factory_kwargs()).lr_lambdas[0]


COSINE = partial(warmup_cosine, warmup_fraction=0.1, min_lr_ratio=0.01)


@pytest.mark.parametrize("epochs_now", [4, 3])  # longer, and shorter than planned
def test_a_cosine_schedule_resumed_for_another_length_goes_on_from_where_it_was(epochs_now):
    first = plan_steps(COSINE, run_of(2 if epochs_now == 4 else 5), None, {})
    then = factor_of(COSINE, first)
    reached = 10
    resumed = saved(first, reached, {"trainer.max_epochs": 2})
    plan = plan_steps(COSINE, run_of(epochs_now), resumed, {"trainer.max_epochs": epochs_now})
    now = factor_of(COSINE, plan)
    end = epochs_now * 10
    assert plan.total_steps == end
    # the steps already taken are those the checkpoint took, and the rate goes on from its value
    for step in range(reached + 1):
        assert now(step) == pytest.approx(then(step))
    # then it decays without a jump and ends at its end value at the new last step
    after = [now(step) for step in range(reached, end + 1)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))
    assert now(end) == pytest.approx(0.01) and now(end - 1) > 0.01


def test_a_schedule_resumed_for_the_same_length_is_the_one_it_was_built_as():
    first = plan_steps(COSINE, run_of(3), None, {})
    plan = plan_steps(COSINE, run_of(3), saved(first, 12, {}), {})
    assert plan == first
    cycle = partial(one_cycle, max_lr_factor=10.0)
    first = plan_steps(cycle, run_of(3), None, {})
    assert plan_steps(cycle, run_of(3), saved(first, 12, {}), {}) == first


def test_a_cosine_schedule_rebuilt_twice_keeps_its_first_part():
    first = plan_steps(COSINE, run_of(2), None, {})
    second = plan_steps(COSINE, run_of(4), saved(first, 10, {}), {})
    third = plan_steps(COSINE, run_of(6), saved(second, 30, {}), {})
    before, after = factor_of(COSINE, second), factor_of(COSINE, third)
    for step in range(31):
        assert after(step) == pytest.approx(before(step))
    assert after(60) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("then", "now", "named"),
    [
        ({"trainer.max_epochs": 1}, {"trainer.max_epochs": 2}, "trainer.max_epochs: 1 in the "
         "checkpoint, 2 now"),
        ({"data.batch_size": 4}, {"data.batch_size": 2}, "data.batch_size: 4 in the checkpoint, "
         "2 now"),
    ],
)  # fmt: skip
def test_a_one_cycle_schedule_resumed_for_another_length_is_refused_naming_the_key(
    then, now, named
):
    cycle = partial(one_cycle, max_lr_factor=10.0)
    first = plan_steps(cycle, run_of(1), None, then)
    run = run_of(2) if "trainer.max_epochs" in then else run_of(1, per_epoch=20)
    with pytest.raises(ConfigError) as err:
        plan_steps(cycle, run, saved(first, 5, then), now)
    message = str(err.value)
    assert named in message
    assert f"{next(iter(then))}={next(iter(then.values()))}" in message  # the way back
    assert "auto_resume=false" in message


def test_a_one_cycle_schedule_resumed_on_another_number_of_processes_is_refused():
    cycle = partial(one_cycle, max_lr_factor=10.0)
    first = plan_steps(cycle, run_of(2, per_epoch=10, world_size=2), None, {})
    with pytest.raises(ConfigError, match=r"2 processes in the checkpoint, 1 now"):
        plan_steps(cycle, run_of(2, per_epoch=20), saved(first, 10, {}), {})


def test_a_checkpoint_without_a_plan_is_read_from_its_schedule_state():
    """Checkpoints written before plans were: a OneCycleLR's own state holds its length."""
    cycle = partial(one_cycle, max_lr_factor=10.0)
    old = Resumed(2, None, None, {"total_steps": 2})
    with pytest.raises(ConfigError, match="built for 2 optimizer steps"):
        plan_steps(cycle, run_of(2, per_epoch=2), old, {})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_cycle_resumed_with_more_epochs_is_refused_before_its_first_step(synth_root, tmp_path):
    """The reported failure: ``Tried to step 3 times`` deep inside training, as a traceback."""
    run = tmp_path / "run"
    train(compose_config("train", overrides(synth_root, "scheduler=onecycle"), run))
    last = run / "checkpoints" / "last.ckpt"
    before = sha256(last)
    longer = overrides(synth_root, "scheduler=onecycle", "trainer.max_epochs=2")
    with pytest.raises(ConfigError) as err:
        train(compose_config("train", longer, run))
    message = str(err.value)
    assert "one_cycle schedule cannot resume" in message
    assert "trainer.max_epochs: 1 in the checkpoint, 2 now" in message
    assert "trainer.max_epochs=1" in message
    assert sha256(last) == before  # not a step was taken, nothing was saved


def test_cosine_resumed_with_more_epochs_trains_to_its_new_end(synth_root, tmp_path, caplog):
    run = tmp_path / "run"
    stop_after_first = ["+callbacks.early_stopping.stopping_threshold=-1"]  # a preempted job
    two = overrides(synth_root, "scheduler=cosine", "trainer.max_epochs=2")
    train(compose_config("train", [*two, *stop_after_first], run))
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 2
    three = overrides(synth_root, "scheduler=cosine", "trainer.max_epochs=3")
    with caplog.at_level(logging.WARNING, logger="covidqu.models.schedulers"):
        train(compose_config("train", three, run))
    assert "trainer.max_epochs: 2 in the checkpoint, 3 now" in caplog.text
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6
    plan = resumed["covidqu"]["schedule"]["plan"]
    assert plan["total_steps"] == 6 and plan["stretch"][-1] == [6.0, 4.0]
    lr = resumed["optimizer_states"][0]["param_groups"][0]
    assert lr["lr"] == pytest.approx(lr["initial_lr"] * 0.01)  # at its end value, at the end


def test_a_resume_into_another_fold_is_refused_naming_both(synth_root, tmp_path):
    run = tmp_path / "run"
    folds = ["data.num_folds=2", "data.fold=0"]
    train(compose_config("train", overrides(synth_root, *folds), run))
    recipe = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["covidqu"]
    assert (recipe["preprocess"]["num_folds"], recipe["preprocess"]["fold"]) == (2, 0)
    other = compose_config("train", overrides(synth_root, "data.num_folds=2", "data.fold=1"), run)
    with pytest.raises(ConfigError, match=r"data\.fold: 0 in the checkpoint, 1 now"):
        check_resume(other, run)
    official = compose_config("train", overrides(synth_root), run)
    with pytest.raises(ConfigError, match=r"data\.num_folds: 2 in the checkpoint, None now"):
        check_resume(official, run)
    assert check_resume(compose_config("train", overrides(synth_root, *folds), run), run)
