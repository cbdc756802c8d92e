"""``ema=true``: an exponential moving average of the weights, validated, checkpointed, scored
and resumed.

One tiny deterministic run (9 training images in batches of 2: 4 optimizer steps per epoch, 2
epochs, no augmentation) with ``ema_decay=0.5``, so that the average is far from the raw
weights, records the raw weights after every step; the average the checkpoints hold is computed
from those by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from covidqu.errors import ConfigError, RunInterrupted
from covidqu.eval.run import evaluate
from covidqu.runtime.checks import check_values
from covidqu.train.checks import check_resume
from covidqu.train.run import train

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics
from shared_folders import SharedFolders

DECAY = 0.5
#: A network of 0.1 M weights (timm's test ResNet), so that keeping every step's weights is cheap.
NET = ["encoder=timm", "encoder.name=tu-test_resnet", "encoder.weights=null"]
BASE = [
    *(o for o in TINY if not o.startswith("encoder")),
    *NET,
    "augment=none",
    "trainer.deterministic=true",
    "data.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "model.encoder_depth=3",
    "model.decoder_channels=[32,16,8]",
    "ema=true",
    f"ema_decay={DECAY}",
]
STEPS = 8  # 4 per epoch


class RecordWeights(pl.Callback):
    """Saves the module's raw weights after every optimizer step, by step, to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = pl_module.state_dict()
        self.steps[trainer.global_step] = {k: v.detach().clone() for k, v in state.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.steps, self.path)


def overrides(root: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.root={root}", *extra]


@pytest.fixture(scope="module")
def reference(synth_root: Path, shared_folders: SharedFolders) -> Path:
    """The uninterrupted run, tested; ``steps.pt`` holds its raw weights after each step."""

    def build(out: Path) -> None:
        record = [
            "+callbacks.record._target_=test_ema.RecordWeights",
            f"+callbacks.record.path={out / 'steps.pt'}",
        ]
        train(compose_config("train", overrides(synth_root, *record), out))

    return shared_folders.get("ema-reference", build)


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    got, want = floats(got), floats(want)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def by_hand(steps: dict[int, dict[str, torch.Tensor]], decay: float) -> dict[int, dict]:
    """The average after each step: the first step's weights, then decay * avg + (1 - decay) * w."""
    average: dict[int, dict[str, torch.Tensor]] = {1: floats(steps[1])}
    for step in range(2, max(steps) + 1):
        before = average[step - 1]
        average[step] = {
            k: decay * before[k] + (1 - decay) * w for k, w in floats(steps[step]).items()
        }
    return average


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values


def test_checkpoints_hold_the_average_with_the_decay_asked(reference: Path):
    steps = torch.load(reference / "steps.pt", weights_only=True)
    assert sorted(steps) == list(range(1, STEPS + 1))
    average = by_hand(steps, DECAY)
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = load(reference / "checkpoints" / name)
        step = ckpt["global_step"]
        assert_same(ckpt["state_dict"], average[step])  # what eval, predict and export load
        if name == "best.ckpt":  # the weights alone: nothing a resume reads
            assert "current_model_state" not in ckpt and "averaging_state" not in ckpt
            continue
        assert_same(ckpt["current_model_state"], steps[step])  # what training goes on from
        assert int(ckpt["averaging_state"]["n_averaged"]) == step
    assert load(reference / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    far = floats(steps[STEPS])
    assert any(not torch.allclose(v, far[k]) for k, v in average[STEPS].items())


def test_the_recipe_and_metrics_say_the_weights_were_averaged(reference: Path):
    recipe = load(reference / "checkpoints" / "best.ckpt")["covidqu"]
    assert recipe["ema"] == {"enabled": True, "decay": DECAY}
    assert read_metrics(reference)["ema_decay"] == DECAY


def test_validation_and_test_score_the_averaged_weights(reference: Path, synth_root, tmp_path):
    metrics = read_metrics(reference)
    monitor = metrics["monitor"]
    best = load(reference / metrics["best_checkpoint"])
    # validation during training (which picked best.ckpt) scored what best.ckpt holds
    logged = [r for r in read_csv(reference / "csv" / "metrics.csv") if r.get(monitor)]
    at_best = [float(r[monitor]) for r in logged if int(r["step"]) == best["global_step"] - 1]
    assert at_best == [pytest.approx(metrics[monitor], abs=1e-5)]
    # training's test of best.ckpt scored its averaged state_dict, as eval does
    args = [f"ckpt_path={reference / metrics['best_checkpoint']}", f"data.root={synth_root}"]
    args += ["data.batch_size=2", "data.num_workers=0", "num_overlays=0"]
    args += ["trainer.enable_progress_bar=false"]
    scored = evaluate(compose_config("eval", args, tmp_path))
    assert {k for k in metrics if k.startswith("test/")}
    for key in (k for k in metrics if k.startswith("test/")):
        assert scored[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_a_run_interrupted_mid_epoch_resumes_the_same_average(reference, synth_root, tmp_path):
    stop = [
        "+callbacks.stop_at._target_=signal_helpers.SignalAt",
        "+callbacks.stop_at.epoch=1",
        "+callbacks.stop_at.batch=1",
        "+callbacks.stop_at.send=SIGINT",
    ]
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train(compose_config("train", overrides(synth_root, *stop), run))
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    train(compose_config("train", overrides(synth_root, *stop), run))  # resumes from last.ckpt
    got, want = (
        load(run / "checkpoints" / "last.ckpt"),
        load(reference / "checkpoints" / "last.ckpt"),
    )
    assert got["global_step"] == want["global_step"] == STEPS
    assert_same(got["state_dict"], want["state_dict"])
    assert_same(got["current_model_state"], want["current_model_state"])
    assert int(got["averaging_state"]["n_averaged"]) == STEPS
    for key in (k for k in read_metrics(reference) if k.startswith("val/")):
        assert read_metrics(run)[key] == pytest.approx(read_metrics(reference)[key], abs=1e-5)


@pytest.mark.parametrize(
    "change, said",
    [("ema=false", "ema: True in the checkpoint, False now"), ("ema_decay=0.9", "ema_decay: 0.5")],
)
def test_a_resume_that_changes_the_averaging_is_refused(reference, synth_root, change, said):
    cfg = compose_config("train", overrides(synth_root, change), reference)
    with pytest.raises(ConfigError, match="holds a run of another config") as err:
        check_resume(cfg, reference)
    assert said in str(err.value)


@pytest.mark.parametrize(
    "value, said",
    [
        ("ema_decay=1.0", "ema_decay=1.0: must be a number between 0 and 1 (exclusive)"),
        ("ema_decay=0", "ema_decay=0: must be a number between 0 and 1"),
        ("ema=maybe", "ema='maybe': must be true or false, e.g. ema=true"),
    ],
)
def test_bad_values_are_refused_naming_the_key(value, said, tmp_path):
    cfg = compose_config("train", [*TINY, value], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_values(cfg, "train")
    assert said in str(err.value)
