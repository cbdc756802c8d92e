"""No checkpoint or weights file is ever unpickled beyond tensors and plain values.

A file carries one extra object whose unpickling creates a marker file (as ``os.system`` would
run a command). Every command that loads a file must refuse it, name it and never create the
marker, even where ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` asks torch to unpickle freely whenever
a caller leaves ``weights_only`` to torch's default; and a real covidqu checkpoint, with every
scheduler of conf/scheduler/, must still load and resume under ``weights_only=True``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from covidqu.analyze.run import analyze
from covidqu.errors import CheckpointError
from covidqu.eval.run import evaluate
from covidqu.models.checkpoint import load_module
from covidqu.models.networks import build_classifier
from covidqu.predict.run import predict
from covidqu.runtime.cli import reports_errors, user_error
from covidqu.train.run import train

from pipeline_helpers import CONF, TINY, compose_config, run_module

#: Asks torch to unpickle anything wherever a caller does not pass ``weights_only`` itself.
UNSAFE_DEFAULT = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class Payload:
    """Unpickling it creates ``marker``: the stand-in for any code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(autouse=True)
def _unsafe_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in UNSAFE_DEFAULT.items():
        monkeypatch.setenv(key, value)


def tiny(root: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", *extra]


@pytest.fixture(scope="module")
def lung_run(trained_run: Callable[[str], Path]) -> Path:
    """A run folder of a tiny lung model (shared, read-only: poisoned copies go elsewhere)."""
    return trained_run("lung")


def poison(source: Path, dest: Path, marker: Path) -> Path:
    """``source`` (a checkpoint or a state dict) saved to ``dest`` with a :class:`Payload`."""
    content = torch.load(source, weights_only=True)
    content["notes"] = Payload(marker)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, dest)
    return dest


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def poisoned(lung_run: Path, tmp_path: Path, marker: Path) -> Path:
    """A real covidqu checkpoint carrying a payload, checked to run when unpickled freely."""
    path = poison(lung_run / "checkpoints" / "last.ckpt", tmp_path / "shared" / "best.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.is_file(), "the payload must run when unpickled freely, or the tests prove nil"
    marker.unlink()
    return path


def assert_refused(err: BaseException, key: str, path: Path) -> None:
    assert isinstance(err, CheckpointError), repr(err)
    message = str(err)
    assert f"{key}={path}" in message
    assert "Python objects besides tensors and plain values" in message
    assert "pathlib.Path" in message  # what it would have unpickled
    assert "could run code" in message


# -- refused everywhere, code never run ------------------------------------------------------


def test_training_resumed_with_ckpt_path_refuses_the_file(synth_root, tmp_path, poisoned, marker):
    cfg = compose_config(
        "train", tiny(synth_root, "trainer.max_epochs=2", f"ckpt_path={poisoned}"), tmp_path / "r"
    )
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    assert not marker.exists()
    assert_refused(err.value, "ckpt_path", poisoned)
    assert "re-save a clean copy" in str(err.value) and "torch.save(ckpt" in str(err.value)


def test_training_auto_resumed_from_the_folder_refuses_its_last_checkpoint(
    synth_root, lung_run, tmp_path, marker
):
    run = tmp_path / "requeued"
    last = poison(lung_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(CheckpointError) as err:
        train(compose_config("train", tiny(synth_root, "trainer.max_epochs=2"), run))
    assert not marker.exists()
    assert_refused(err.value, "auto_resume", last)  # the key that chose the file
    assert "auto_resume=false" in str(err.value)
    assert not (run / "failure.txt").exists()  # refused before the run: the folder is as it was


def _eval(path: Path, root: Path, out: Path) -> Any:
    return evaluate(
        compose_config(
            "eval", [f"ckpt_path={path}", f"data.root={root}", "data.num_workers=0"], out
        )
    )


def _analyze(lung: Path | None, infection: Path, root: Path, out: Path) -> Any:
    images = root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test"
    overrides = [f"infection_ckpt={infection}", f"input={images}", "recursive=true", "device=cpu"]
    if lung is not None:
        overrides.append(f"lung_ckpt={lung}")
    return analyze(compose_config("analyze", overrides, out))


@pytest.mark.parametrize(
    ("key", "run"),
    [
        ("ckpt_path", lambda bad, good, root, out: _eval(bad, root, out)),
        (
            "ckpt_path",
            lambda bad, good, root, out: predict(
                bad, root / "Lung Segmentation Data", out, recursive=True
            ),
        ),
        ("lung_ckpt", lambda bad, good, root, out: _analyze(bad, good, root, out)),
        ("infection_ckpt", lambda bad, good, root, out: _analyze(good, bad, root, out)),
    ],
    ids=["eval", "predict", "analyze-lung_ckpt", "analyze-infection_ckpt"],
)
def test_commands_refuse_the_file(key, run, synth_root, lung_run, tmp_path, poisoned, marker):
    good = lung_run / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError) as err:
        run(poisoned, good, synth_root, tmp_path / "out")
    assert not marker.exists()
    assert_refused(err.value, key, poisoned)  # named by the key the user gave it with


@pytest.mark.parametrize("encoder", ["resnet18", "timm"])  # smp's own encoder; timm's tu-
def test_encoder_weights_file_is_refused(encoder, synth_root, tmp_path, marker):
    import segmentation_models_pytorch as smp

    clean = tmp_path / "clean.pth"
    torch.save(smp.Unet("resnet18", encoder_weights=None).encoder.state_dict(), clean)
    weights = poison(clean, tmp_path / "weights.pth", marker)
    cfg = compose_config(
        "train",
        tiny(synth_root, "debug=fdr", f"encoder={encoder}", f"encoder.weights={weights}"),
        tmp_path / "run",
    )
    with pytest.raises(Exception) as raised:  # Hydra wraps it; the command unwraps it
        train(cfg)
    assert not marker.exists()
    found = user_error(raised.value)
    assert isinstance(found, CheckpointError)
    assert_refused(found, "encoder.weights", weights)
    assert "torch.save(net.state_dict(), path)" in str(found)


def test_classifier_weights_file_is_refused(tmp_path, marker):
    clean = tmp_path / "clean.pth"
    torch.save(build_classifier("resnet18", None).state_dict(), clean)
    weights = poison(clean, tmp_path / "weights.pth", marker)
    with pytest.raises(CheckpointError) as err:
        build_classifier("resnet18", str(weights))
    assert not marker.exists()
    assert_refused(err.value, "encoder.weights", weights)


@pytest.mark.parametrize("asked", [None, False])
def test_the_trainer_reads_every_file_weights_only_whatever_a_caller_asks(
    asked, poisoned, marker, lung_run
):
    """The trainer's checkpoint plugin: a resume, and the state Lightning's LR finder saves and
    restores (which asks for torch's default, unpickling anything under the variable set here)."""
    import pickle

    from covidqu.runtime.checkpoint_io import AtomicCheckpointIO

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(poisoned, weights_only=asked)
    assert not marker.exists()
    ckpt = AtomicCheckpointIO().load_checkpoint(lung_run / "checkpoints" / "last.ckpt")
    assert ckpt["optimizer_states"]  # a covidqu checkpoint still reads whole


def test_a_refused_resume_ends_the_command_cleanly(synth_root, tmp_path, poisoned, marker, capsys):
    """What ``python -m covidqu.train ckpt_path=...`` runs: the message, exit 2, no traceback."""
    cfg = compose_config("train", tiny(synth_root, f"ckpt_path={poisoned}"), tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        reports_errors(train)(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: ckpt_path={poisoned} holds Python objects" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_eval_command_refuses_the_file_with_exit_code_2(synth_root, tmp_path, poisoned, marker):
    proc = run_module(
        "covidqu.eval",
        [f"ckpt_path={poisoned}", f"data.root={synth_root}", f"hydra.run.dir={tmp_path / 'e'}"],
        env=UNSAFE_DEFAULT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: ckpt_path={poisoned} holds Python objects" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists()


# -- a covidqu checkpoint still loads and resumes --------------------------------------------


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every ``torch.load`` call from here on, as (file, weights_only asked for)."""
    calls: list[tuple[str, Any]] = []
    real = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((str(getattr(f, "path", getattr(f, "name", f))), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


#: A short run that stops after its first of two epochs, as a preempted job would: its
#: last.ckpt is then resumed with the same length of run (one-cycle schedules need that).
PREEMPTED = ["+callbacks.early_stopping.stopping_threshold=-1"]  # val/dice > -1: stop


# One scheduler by default, every one with -m slow: the default suite keeps to its time budget.
@pytest.mark.parametrize(
    "scheduler",
    [
        name if name == "onecycle" else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
    ],
)
def test_a_covidqu_checkpoint_resumes_and_loads_weights_only(
    scheduler, synth_root, tmp_path, torch_loads
):
    run = tmp_path / "run"
    overrides = tiny(
        synth_root,
        f"scheduler={scheduler}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        # a mapping among the data options: it must reach the checkpoint as a plain dict
        "data.limit_per_class={train:8,val:4,test:4}",
    )
    train(compose_config("train", [*overrides, *PREEMPTED], run))
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["epoch"] == 0
    callbacks = " ".join(first["callbacks"])
    assert "ModelCheckpoint" in callbacks and "EarlyStopping" in callbacks
    assert first["optimizer_states"] and first["loops"]
    assert first["datamodule_hyper_parameters"]["limit_per_class"] == {
        "train": 8,
        "val": 4,
        "test": 4,
    }
    assert len(first["lr_schedulers"]) == (scheduler != "none")
    torch_loads.clear()

    # the requeued job: auto-resume from last.ckpt, then validate best.ckpt
    cfg = compose_config("train", overrides, run)
    train(cfg)
    read = {(Path(f).name, wo) for f, wo in torch_loads}
    assert read == {("last.ckpt", True), ("best.ckpt", True)}, torch_loads
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * first["global_step"]
    if cfg.scheduler.interval == "step":  # the schedule went on where it stopped, not anew
        assert resumed["lr_schedulers"][0]["last_epoch"] == resumed["global_step"]

    # and eval, predict and analyze rebuild the module from it
    torch_loads.clear()
    module = load_module(run / "checkpoints" / "best.ckpt")
    assert module.recipe["preprocess"]["image_size"] == 32
    assert [wo for _, wo in torch_loads] == [True]
