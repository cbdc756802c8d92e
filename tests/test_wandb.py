"""Weights & Biases without credentials or network: offline runs, groups, names, config, media.

Every run here finds no API key (no ``WANDB_API_KEY``, an empty home without a netrc file) and
must go offline on its own, never reaching for the network nor asking for a login. What a run
recorded is read back from its transaction log (``run-<id>.wandb``), the file ``wandb sync``
uploads.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
from omegaconf import OmegaConf

from covidqu.constants import CLASSES
from covidqu.runtime import loggers
from covidqu.runtime import wandb_logger as wb
from covidqu.runtime.callbacks import WandbMedia

from pipeline_helpers import TINY, read_csv, run_module
from shared_folders import SharedFolders

#: Environment variables that could give a test run credentials, a mode or another server.
WANDB_VARS = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_DISABLED",
    "WANDB_BASE_URL",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_RUN_GROUP",
    "WANDB_NAME",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "NETRC",
)

#: A short run: one epoch of two training and two validation batches of four 32 px images.
SHORT = [
    *TINY,
    "debug=limit",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "test=false",
]
VAL_IMAGES = 8  # two validation batches of four


def isolated_env(base: Path) -> dict[str, str]:
    """A home without credentials, and W&B's own folders, all under ``base``."""
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "NETRC": str(home / ".netrc"),  # does not exist
        "WANDB_DIR": str(base / "wandb_dir"),
        "WANDB_CACHE_DIR": str(base / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(base / "wandb_config"),
        "WANDB_DATA_DIR": str(base / "wandb_data"),
        "XDG_CACHE_HOME": str(base / "xdg_cache"),
    }


def run_offline(args: list[str], base: Path) -> Any:
    """``python -m covidqu.train ARGS`` with no W&B credentials in sight."""
    with pytest.MonkeyPatch.context() as mp:
        for name in WANDB_VARS:
            mp.delenv(name, raising=False)
        return run_module("covidqu.train", args, env=isolated_env(base), timeout=600)


def shared_offline(
    shared_folders: SharedFolders, name: str, args: Callable[[Path], list[str]]
) -> tuple[Path, subprocess.CompletedProcess]:
    """``run_offline(args(base), base)`` once per session in the shared folder ``base``
    (read-only to the tests), and the finished process, its output kept in files there."""
    streams = ("stdout", "stderr", "returncode")

    def build(base: Path) -> None:
        proc = run_offline(args(base), base)
        for stream in streams:
            (base / f"{stream}.txt").write_text(str(getattr(proc, stream)))

    base = shared_folders.get(name, build)
    out, err, code = ((base / f"{stream}.txt").read_text() for stream in streams)
    return base, subprocess.CompletedProcess([], int(code), out, err)


# -- reading an offline run back -------------------------------------------------------------------


def _records(path: Path) -> Iterator[bytes]:
    """Records of a W&B transaction log (a LevelDB-style log of 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first part
            parts = chunk
        elif kind == 3:  # middle part
            parts += chunk
        elif kind == 4:  # last part
            yield parts + chunk
            parts = b""


def _set(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_run(run_dir: Path) -> dict[str, Any]:
    """Group, name, tags, config, summary and artifacts an offline run recorded."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "artifacts": [], "files": []}
    for raw in _records(log_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=record.run.run_group,
                name=record.run.display_name,
                tags=list(record.run.tags),
                project=record.run.project,
            )
            for item in record.run.config.update:
                _set(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out["summary"], item)
        elif kind == "artifact":
            out["artifacts"].append(
                {"type": record.artifact.type, "name": record.artifact.name}
                | {"aliases": list(record.artifact.aliases)}
            )
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/wandb/offline-run-*"))


# -- a two-job sweep through the real entry point ------------------------------------------------


@pytest.fixture(scope="module")
def sweep(synth_root: Path, shared_folders: SharedFolders) -> dict[str, Any]:
    """A two-job W&B sweep (built once per session, read-only)."""
    base, proc = shared_offline(
        shared_folders,
        "wandb-sweep",
        lambda base: [
            "-m",
            "logger=wandb",
            "model=unet,fpn",
            *SHORT,
            f"data.root={synth_root}",
            f"hydra.sweep.dir={base / 'sweep'}",
        ],
    )
    sweep_dir = base / "sweep"
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = [p.read_text() for p in sweep_dir.glob("*/failure.txt")]
    assert not failures, failures[0][-3000:]
    return {"dir": sweep_dir, "base": base, "proc": proc}


def test_a_sweep_makes_one_offline_run_per_job_in_one_group(sweep):
    sweep_dir = sweep["dir"]
    runs = offline_runs(sweep["base"])
    assert [r.parent.parent.name for r in runs] == ["0", "1"], runs  # one in each job folder
    assert not list(sweep["base"].glob("**/wandb/run-*")), "a run tried to go online"
    records = [read_run(r) for r in runs]
    assert {r["group"] for r in records} == {sweep_dir.name}
    assert [r["project"] for r in records] == ["covidqu", "covidqu"]
    assert [r["name"] for r in records] == ["model=unet", "model=fpn"]  # what the sweep varies
    assert all(r["tags"] == ["lung"] for r in records)


def test_each_sweep_run_holds_its_resolved_config_and_metrics(sweep):
    for run_dir, arch in zip(offline_runs(sweep["base"]), ["unet", "fpn"], strict=True):
        run = read_run(run_dir)
        config = run["config"]
        assert config["model"]["arch"] == arch
        assert config["model"]["encoder_name"] == "resnet18"  # interpolations resolved
        assert config["encoder"]["name"] == "resnet18"
        assert config["task"]["monitor"] == "val/dice"
        assert config["data"]["image_size"] == 32
        assert config["paths"]["output_dir"] == str(run_dir.parent.parent)
        assert 0.0 <= run["summary"]["val/dice"] <= 1.0
        assert "val/loss" in run["summary"]


def test_the_offline_fallback_is_announced_with_the_sync_command(sweep):
    # not a terminal: the log lines alone (stdout), no banner repeating them (stderr)
    said = sweep["proc"].stdout + sweep["proc"].stderr
    assert said.count("W&B is logging OFFLINE") == 2  # once per job
    assert "no W&B API key found" in said
    for run_dir in offline_runs(sweep["base"]):
        # as the job starts, and once more as it ends; W&B's own header and footer say
        # nothing more (silent offline)
        assert said.count(f"wandb sync {run_dir}") == 2, said
    assert f"wandb sync {sweep['dir']}/*/wandb/offline-run-*" in said
    assert "Tracking run with wandb" not in said and "wandb: Run summary" not in said
    # Lightning's notices a user cannot act on (covidqu/runtime/quiet.py)
    assert "💡 Tip" not in said
    assert "The `srun` command is available" not in said


def test_segmentation_runs_log_validation_overlays(sweep):
    for run_dir in offline_runs(sweep["base"]):
        run = read_run(run_dir)
        overlays = run["summary"]["val/overlays"]
        assert overlays["_type"] == "images/separated"
        assert overlays["count"] == 4  # the first validation batch, below num_images=8
        names = overlays["filenames"]
        assert len(names) == 4 and all(n.startswith("media/images/val/overlays") for n in names)
        picture = cv2.imread(str(run_dir / "files" / names[0]))
        assert picture is not None
        height, width = picture.shape[:2]
        assert width >= 3 * 256 and width > 2.5 * height  # image | truth | prediction
        assert all(c.startswith(("covid", "non_COVID", "Normal")) for c in overlays["captions"])


# -- CSV and W&B together, classification, checkpoint artifact --------------------------------


@pytest.fixture(scope="module")
def classify_many(synth_root: Path, shared_folders: SharedFolders) -> dict[str, Any]:
    """A classification run logging to CSV and W&B (built once per session, read-only)."""
    base, proc = shared_offline(
        shared_folders,
        "wandb-many",
        lambda base: [
            "task=classify",
            "logger=many",
            "logger.wandb.log_model=true",
            *SHORT,
            f"data.root={synth_root}",
            f"hydra.run.dir={base / 'run'}",
        ],
    )
    run_dir = base / "run"
    assert proc.returncode == 0, proc.stderr[-4000:]
    (offline,) = offline_runs(base)
    return {"dir": run_dir, "base": base, "proc": proc, "run": read_run(offline), "path": offline}


def test_logger_many_writes_csv_wandb_and_tensorboard(classify_many):
    run_dir = classify_many["dir"]
    rows = read_csv(run_dir / "csv" / "metrics.csv")
    assert any(r.get("val/acc") for r in rows)
    assert classify_many["path"].parent.parent == run_dir
    run = classify_many["run"]
    assert 0.0 <= run["summary"]["val/f1_macro"] <= 1.0
    assert run["config"]["task"]["name"] == "classify"
    assert run["group"] == ""  # a single run without an experiment has no group
    assert "task=classify" in run["name"] and "data.root" not in run["name"]
    hparams = (run_dir / "csv" / "hparams.yaml").read_text()
    assert "classify" in hparams  # the config went to the CSV logger too
    from test_tensorboard import events, hparams_entry  # the third logger of many

    board = events(run_dir / "tensorboard")
    assert "val/acc" in board.Tags()["scalars"]
    assert "val/confusion_matrix/text_summary" in board.Tags()["tensors"]
    params, shown = hparams_entry(board)
    assert params["task/name"] == "classify" and "val/f1_macro" in shown


def test_classification_runs_log_the_confusion_matrix(classify_many):
    run, path = classify_many["run"], classify_many["path"]
    table = run["summary"]["val/confusion_matrix"]
    assert table["_type"] == "table-file"
    content = json.loads((path / "files" / table["path"]).read_text())
    assert content["columns"] == ["truth", *CLASSES]
    assert [row[0] for row in content["data"]] == list(CLASSES)
    assert sum(sum(row[1:]) for row in content["data"]) == VAL_IMAGES
    assert "val/confusion_matrix_plot_table" in run["summary"]  # the W&B chart's data


def test_log_model_records_the_best_checkpoint_as_an_artifact(classify_many):
    models = [a for a in classify_many["run"]["artifacts"] if a["type"] == "model"]
    assert models, classify_many["run"]["artifacts"]
    assert any("best" in a["aliases"] for a in models)
    assert all(a["name"].startswith("model-") for a in models)


# -- units: credentials, modes, names, config, the media callback ------------------------------


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No W&B credentials, W&B's folders in ``tmp_path``, and no Hydra config left by others."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    for name in WANDB_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in isolated_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    return tmp_path / "home"


def test_credentials_come_from_the_environment_or_netrc(no_credentials, monkeypatch):
    assert wb.find_credentials() is None
    assert wb.choose_mode(None)[0] == "offline"
    assert wb.choose_mode(False)[0] == "offline"  # asking for online does not make a key
    netrc = no_credentials / ".netrc"
    netrc.write_text("machine example.org login user password secret\n")
    assert wb.find_credentials() is None  # another host's entry does not count
    netrc.write_text("machine api.wandb.ai login user password k3y\n")
    assert wb.find_credentials() == f"netrc ({netrc})"
    assert wb.choose_mode(None) == ("online", None)
    assert wb.choose_mode(True) == ("offline", "logger.wandb.offline=true")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wb.find_credentials() is None
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wb.find_credentials() == "WANDB_API_KEY"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wb.choose_mode(None) == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wb.choose_mode(None) == ("disabled", None)


def test_the_factory_never_asks_for_a_login_and_keeps_log_model(no_credentials, tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    assert wb.default_group_and_name() == (None, None)  # outside Hydra: W&B's own defaults

    logger = wb.wandb_logger(save_dir=tmp_path / "run", offline=False, log_model=True)
    assert isinstance(logger, WandbLogger) and logger._experiment is None  # nothing started yet
    assert logger._wandb_init["mode"] == "offline" and not logger.offline_requested
    assert "no W&B API key" in logger.offline_reason
    assert (tmp_path / "run").is_dir()
    forced = wb.wandb_logger(save_dir=tmp_path / "forced", offline=True, log_model=True)
    assert forced._wandb_init["mode"] == "offline" and forced.offline_requested
    assert forced._log_model is True  # Lightning's own offline flag would refuse this
    assert "WANDB_MODE" not in os.environ  # no process-wide side effect


def test_finish_loggers_ends_the_run_and_marks_a_failure(no_credentials, tmp_path):
    import wandb

    logger = wb.wandb_logger(save_dir=tmp_path / "run", name="job")
    try:
        logger.log_metrics({"val/dice": 0.25}, step=0)
        raise RuntimeError("the job failed")
    except RuntimeError:
        loggers.finish_loggers([logger])  # as in a `finally:` after an error
    assert wandb.run is None
    assert logger.sync_command() == f"wandb sync {offline_runs(tmp_path / 'run')[0]}"
    (run_dir,) = offline_runs(tmp_path / "run")
    deadline = time.monotonic() + 20  # the service writes the run's last record on its own time
    while "exit_code" not in (run := read_run(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.get("exit_code") == 1 and run["summary"]["val/dice"] == 0.25
    loggers.finish_loggers([logger])  # twice: harmless


def _hydra_conf(tmp_path: Path, mode: str, overrides: list[str], **extra: Any) -> Any:
    conf = {
        "mode": mode,
        "overrides": {"task": overrides},
        "runtime": {"output_dir": str(tmp_path / "runs" / "2026-01-01_10-00-00"), "choices": {}},
        "sweep": {"dir": str(tmp_path / "multiruns" / "2026-01-01_10-00-00")},
        "sweeper": {"params": None},
    }
    return OmegaConf.merge(conf, extra)


def test_group_and_name_of_sweep_jobs_and_single_runs(tmp_path):
    sweep_dir = tmp_path / "multiruns" / "2026-01-01_10-00-00"
    sweep_dir.mkdir(parents=True)
    command = ["model=unet,fpn", "encoder=resnet18,resnet34", "seed=1"]
    OmegaConf.save({"hydra": {"overrides": {"task": command}}}, sweep_dir / "multirun.yaml")
    job = ["model=unet", "encoder=resnet18", "seed=1", "data.root=/data/x", "trainer.max_epochs=3"]
    hc = _hydra_conf(tmp_path, "RunMode.MULTIRUN", job)
    assert wb.default_group_and_name(hc) == ("2026-01-01_10-00-00", "encoder=resnet18,model=unet")

    chosen = {"runtime": {"choices": {"experiment": "lung_unetplusplus_densenet121"}}}
    hc = _hydra_conf(tmp_path, "RunMode.MULTIRUN", job, **chosen)
    group, _ = wb.default_group_and_name(hc)
    assert group == "lung_unetplusplus_densenet121-2026-01-01_10-00-00"

    # a sweeper's search space (e.g. Optuna's params) names the varied keys too
    space = {"params": {"optimizer.lr": "interval(1e-4, 1e-1)"}}
    hc = _hydra_conf(tmp_path, "RunMode.MULTIRUN", [*job, "optimizer.lr=0.01"], sweeper=space)
    assert wb.default_group_and_name(hc)[1] == "encoder=resnet18,model=unet,optimizer.lr=0.01"

    hc = _hydra_conf(tmp_path, "RunMode.RUN", job)
    assert wb.default_group_and_name(hc) == (
        None,
        "encoder=resnet18,model=unet,seed=1,trainer.max_epochs=3",  # data.root: not a name
    )
    excluded = {"job": {"config": {"override_dirname": {"exclude_keys": ["seed"]}}}}
    hc = _hydra_conf(tmp_path, "RunMode.RUN", job, **excluded)  # Hydra's own exclusions count
    assert wb.default_group_and_name(hc)[1] == "encoder=resnet18,model=unet,trainer.max_epochs=3"
    hc = _hydra_conf(tmp_path, "RunMode.RUN", [], **chosen)
    assert wb.default_group_and_name(hc) == ("lung_unetplusplus_densenet121", "2026-01-01_10-00-00")


def test_log_config_gives_every_logger_the_resolved_config(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cfg = OmegaConf.create({"model": {"arch": "unet", "encoder": "${encoder.name}"}})
    cfg.encoder = {"name": "resnet18"}
    first, second = CSVLogger(tmp_path, name="a"), CSVLogger(tmp_path, name="b")
    loggers.log_config([first, second], cfg)
    for logger in (first, second):
        assert logger.experiment.hparams["model"] == {"arch": "unet", "encoder": "resnet18"}
    loggers.log_config([], cfg)  # nothing to log to: nothing happens
    loggers.finish_loggers([first, second])  # no W&B logger among them: nothing to finish


class _Untouchable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the callback ran the model without a W&B logger")

    def predict_masks(self, logits: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the callback ran the model without a W&B logger")


def test_wandb_media_does_nothing_without_a_wandb_logger(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    trainer = pl.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", devices=1)
    callback = WandbMedia(num_images=2)
    module = _Untouchable()
    callback.setup(trainer, module, "fit")
    batch = {"image": torch.zeros(2, 1, 8, 8), "mask": torch.zeros(2, 1, 8, 8), "id": ["a", "b"]}
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    callback.on_validation_end(trainer, module)
    assert callback._pending == []
    with pytest.raises(ValueError, match="every_n_epochs"):
        WandbMedia(every_n_epochs=0)


@pytest.mark.slow
def test_an_unreachable_server_falls_back_to_offline(no_credentials, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    logger = wb.wandb_logger(save_dir=tmp_path / "run")
    assert logger._wandb_init["mode"] == "online"
    try:
        run = logger.experiment
        assert run.settings.mode == "offline"
        logger.log_metrics({"val/dice": 0.5}, step=0)
    finally:
        loggers.finish_loggers([logger])
    (offline,) = offline_runs(tmp_path / "run")
    assert read_run(offline)["summary"]["val/dice"] == 0.5
    assert os.environ.get("WANDB_MODE") is None  # no process-wide side effect


def test_only_rank_zero_logs_under_ddp(synth_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_offline(
        [
            "logger=wandb",
            *SHORT,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            f"data.root={synth_root}",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
    runs = offline_runs(tmp_path)
    assert len(runs) == 1, runs  # one W&B run for the two processes
    assert 0.0 <= read_run(runs[0])["summary"]["val/dice"] <= 1.0
