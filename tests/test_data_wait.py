"""The data-wait meter: the share of training spent waiting for batches, and samples a second.

A loader made slow on purpose (each sample sleeps) must show its delay in ``perf/data_wait`` in
the CSV of every epoch, and in one line naming what to change. Both figures are logged per epoch
beside the other metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from covidqu.data import datasets
from covidqu.runtime.data_wait import DATA_WAIT, SAMPLES_PER_S, DataWaitMeter, hints
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config, read_csv

#: Two epochs of 4 steps of 4 images; no validation beyond one batch.
SHORT = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "test=false",
    "augment=none",
    "postprocess=none",
]


#: Each sample's planted delay: 0.8 s a batch of 4, much longer than a 32 px step.
SLEEP = 0.2
#: Batches of an epoch whose wait falls between its 4 steps. Lightning fetches one batch ahead:
#: batch 1 is fetched before step 0 starts (left out with the loader's start-up), batches 2 and 3
#: between steps 0-1 and 1-2, and nothing is left to fetch before step 3.
MEASURED = 2


def waited_s(row: dict[str, str]) -> float:
    """Seconds an epoch waited: its share of the epoch's time (16 images / samples a second)."""
    return float(row[DATA_WAIT]) * 16 / float(row[SAMPLES_PER_S])


def epochs_of(run: Path) -> list[dict[str, str]]:
    return [r for r in read_csv(run / "csv" / "metrics.csv") if r.get(DATA_WAIT)]


def test_a_slow_loader_shows_as_data_wait_with_a_hint(synth_root, tmp_path, monkeypatch, caplog):
    item = datasets.CXRDataset.__getitem__

    def slow(self, i):
        time.sleep(SLEEP)
        return item(self, i)

    monkeypatch.setattr(datasets.CXRDataset, "__getitem__", slow)
    run = tmp_path / "slow"
    with caplog.at_level(logging.WARNING, logger="covidqu.runtime.data_wait"):
        # a low bar for the hint: on a loaded machine the steps themselves may take seconds
        hinted = [*SHORT, "callbacks.data_wait.warn_above=0.01"]
        train(compose_config("train", [*TINY, f"data.root={synth_root}", *hinted], run))

    rows = epochs_of(run)
    assert len(rows) == 2  # one row an epoch
    for row in rows:
        # the planted delay is all counted, in seconds, whatever else loads the machine; beyond
        # it, reading 8 images of 32 px
        planted = MEASURED * 4 * SLEEP
        assert planted * 0.95 < waited_s(row) < planted + 1.0
        assert 0 < float(row[DATA_WAIT]) <= 1
        assert 0 < float(row[SAMPLES_PER_S]) < 16 / planted  # 16 images in over 1.6 s
    lines = [r.getMessage() for r in caplog.records if "waited for its batches" in r.getMessage()]
    assert len(lines) == 1, lines  # once, not every epoch
    assert "data.cache=packed" in lines[0]


def test_the_wait_is_the_time_between_steps_not_the_steps():
    meter = DataWaitMeter()

    class Module:
        device = type("Device", (), {"type": "cpu"})()

    batch = {"image": [0] * 4}
    for _ in range(4):
        meter.on_train_batch_start(None, Module(), batch, 0)
        time.sleep(0.03)  # the step
        meter.on_train_batch_end(None, Module(), None, batch, 0)
        time.sleep(0.01)  # the wait for the next batch
    share, samples_s = meter.measured()
    # the first step's wait is not measured: 3 waits of 0.01 s in 4 x 0.03 + 3 x 0.01 s
    assert share == pytest.approx(0.03 / 0.15, abs=0.06)
    assert samples_s == pytest.approx(16 / 0.15, rel=0.25)


def test_the_hint_names_only_what_the_run_lacks():
    class Packed:
        num_workers, cache, augment = 64, "packed", []

    class Png:
        num_workers, cache, augment = 0, "none", ["Affine"]

    assert hints(Packed(), on_gpu=True) == []
    found = " ".join(hints(Png(), on_gpu=True))
    assert "data.cache=packed" in found and "augment=gpu_light" in found
    assert "augment=gpu_light" not in " ".join(hints(Png(), on_gpu=False))  # slower on a CPU
