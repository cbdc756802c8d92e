"""Weights & Biases with an offline fallback, named from Hydra.

:func:`wandb_logger` is the ``_target_`` of ``conf/logger/wandb.yaml``. It fills what a sweep
needs from Hydra: the W&B *group* is the sweep, the run *name* the overrides that distinguish the
job, and each job writes its W&B files into its own run folder. Without credentials (no
``WANDB_API_KEY``, no netrc entry for the W&B host) it never prompts for a login: the run goes
offline, says so loudly, and prints the ``wandb sync`` command that uploads it later.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from covidqu.runtime.config import split_override

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"

#: Overrides that say where things are, not what a run is: left out of W&B run names.
NAME_EXCLUDED_KEYS = ("data.root", "data.num_workers", "ckpt_path")
NAME_EXCLUDED_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.")


# -- credentials and mode --------------------------------------------------------------------------


def wandb_host() -> str:
    """The host name W&B talks to (``WANDB_BASE_URL``, else api.wandb.ai)."""
    url = os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST
    return urlparse(url if "//" in url else f"//{url}").hostname or "api.wandb.ai"


def _netrc_files() -> list[Path]:
    if os.environ.get("NETRC"):
        return [Path(os.environ["NETRC"]).expanduser()]
    home = Path(os.path.expanduser("~"))
    return [home / ".netrc", home / "_netrc"]


def find_credentials() -> str | None:
    """Where a W&B API key would come from (``"WANDB_API_KEY"``, ``"netrc (PATH)"``), or None.

    Only the environment and netrc files are read: nothing is sent anywhere, nothing is asked.
    """
    if os.environ.get("WANDB_API_KEY", "").strip():
        return "WANDB_API_KEY"
    host = wandb_host()
    for path in _netrc_files():
        if not path.is_file():
            continue
        try:
            auth = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            return f"netrc ({path})"
    return None


def choose_mode(offline: bool | None) -> tuple[str, str | None]:
    """The W&B mode (``online``, ``offline``, ``disabled``) and, when offline, why.

    ``WANDB_MODE=disabled`` (or ``WANDB_DISABLED=true``) is respected; ``offline=True`` or
    ``WANDB_MODE=offline`` force offline; otherwise the run is online only with credentials.
    """
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "disabled", None
    if offline:
        return "offline", "logger.wandb.offline=true"
    if env_mode in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env_mode}"
    if find_credentials() is None:
        return "offline", (
            f"no W&B API key found (WANDB_API_KEY is unset and no netrc file has an entry for "
            f"{wandb_host()})"
        )
    return "online", None


# -- names from Hydra ------------------------------------------------------------------------------


def _hydra() -> Any | None:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def _parse(overrides: Sequence[str]) -> list[tuple[str, str, bool]]:
    """``(key, input line, is a sweep)`` of each override, as Hydra reads it."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return [(o.key_or_group, o.input_line or "", o.is_sweep_override()) for o in parsed]
    except Exception:  # an override Hydra itself accepted but this parser does not: be simple
        out = []
        for line in overrides:
            key, value = split_override(line)
            out.append((key, line, "," in value))
        return out


def _is_noise(key: str) -> bool:
    return key in NAME_EXCLUDED_KEYS or key.startswith(NAME_EXCLUDED_PREFIXES)


def _hydra_excluded(hc: Any) -> set[str]:
    """``hydra.job.config.override_dirname.exclude_keys``: keys the user keeps out of names."""
    try:
        return {str(k) for k in hc.job.config.override_dirname.exclude_keys or []}
    except Exception:  # not in this HydraConf: nothing excluded
        return set()


def _multirun(hc: Any) -> bool:
    return str(hc.mode) in ("RunMode.MULTIRUN", "MULTIRUN")


def swept_keys(hc: Any) -> set[str]:
    """Keys a multirun varies: sweeps on its command line and the sweeper's ``params``."""
    keys: set[str] = set()
    params = hc.sweeper.get("params") if "sweeper" in hc else None
    if params:
        keys.update(str(k) for k in params)
    sweep_file = Path(str(hc.sweep.dir)) / "multirun.yaml"
    if sweep_file.is_file():
        try:
            task = OmegaConf.load(sweep_file).hydra.overrides.task
            keys.update(k for k, _, sweep in _parse(list(task)) if sweep)
        except Exception as err:  # unreadable: the names fall back to all overrides
            log.debug("could not read the sweep's overrides from %s: %s", sweep_file, err)
    return keys


def _override_name(
    overrides: Iterable[tuple[str, str, bool]], keep: set[str] | None, exclude: set[str]
) -> str:
    lines = [
        line
        for key, line, _ in overrides
        if key not in exclude and (key in keep if keep is not None else not _is_noise(key))
    ]
    return ",".join(sorted(lines))


def _choice(hc: Any, group: str) -> str | None:
    choices = hc.runtime.get("choices") or {}
    value = choices.get(group)
    return None if value in (None, "null", "None") else str(value)


def default_group_and_name(hc: Any | None = None) -> tuple[str | None, str | None]:
    """The W&B group and run name of the current Hydra job (``(None, None)`` outside Hydra).

    Multirun: the group is the sweep folder's name (after ``<experiment>-`` when one experiment
    was chosen for the whole sweep); the name is the job's values of the swept keys, in the
    form of ``hydra.job.override_dirname`` (``encoder=resnet18,model=unet``). Single run: the
    group is the experiment (or none); the name the run's overrides, or its folder's name.
    """
    hc = hc if hc is not None else _hydra()
    if hc is None:
        return None, None
    job_overrides = _parse(list(hc.overrides.task))
    exclude = _hydra_excluded(hc)
    experiment = _choice(hc, "experiment")
    folder = Path(str(hc.runtime.output_dir)).name
    if _multirun(hc):
        keys = swept_keys(hc)
        name = _override_name(job_overrides, keys, exclude) if keys else ""
        name = name or _override_name(job_overrides, None, exclude) or folder
        group = Path(str(hc.sweep.dir)).name
        if experiment and "experiment" not in keys:
            group = f"{experiment}-{group}"
        return group, name
    return experiment, _override_name(job_overrides, None, exclude) or folder


def _run_folder(hc: Any | None) -> str:
    if hc is not None:
        return str(hc.runtime.output_dir)
    return "."


# -- the logger ------------------------------------------------------------------------------------


class CXRWandbLogger(WandbLogger):
    """Lightning's :class:`WandbLogger` that announces an offline run with its ``wandb sync``
    command, and falls back to offline when an online start fails (W&B unreachable).

    Args:
        offline_reason: why the run is offline (``None`` when online); shown in the banner.
        offline_requested: the user asked for offline (``offline=true``, ``WANDB_MODE``): the
            banner still names the ``wandb sync`` command, but the log says it at INFO level.
        sweep_dir: the multirun folder, for a command that uploads every job at once.
        **kwargs: see :class:`pytorch_lightning.loggers.WandbLogger`.
    """

    def __init__(
        self,
        *args: Any,
        offline_reason: str | None = None,
        offline_requested: bool = False,
        sweep_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns that the setting is gone
            self._wandb_init.pop("anonymous", None)
        self.offline_reason = offline_reason
        self.offline_requested = offline_requested
        self.sweep_dir = sweep_dir
        self._announced = False

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        try:
            run = super().experiment
        except Exception as err:
            if self._wandb_init.get("mode") != "online":
                raise
            self.offline_reason = f"W&B could not be reached ({type(err).__name__}: {err})"
            log.warning("%s; this run continues offline", self.offline_reason)
            self._wandb_init["mode"] = "offline"
            self.offline_requested = False
            run = super().experiment
        if self.offline_reason and not self._announced:
            self._announced = True
            announce_offline(
                self.offline_reason,
                offline_run_dir(run),
                self.sweep_dir,
                loud=not self.offline_requested,
            )
        return run

    def sync_command(self) -> str | None:
        """``wandb sync <run folder>`` of an offline run that has started, else None."""
        if self._experiment is None or self._wandb_init.get("mode") != "offline":
            return None
        return f"wandb sync {offline_run_dir(self._experiment)}"


def offline_run_dir(run: Any) -> Path:
    """The folder of a run's local files (``.../wandb/offline-run-<time>-<id>``)."""
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
    if sync_dir:
        return Path(sync_dir)
    return Path(run.dir).parent


#: Whether this process has shown the offline banner (a sweep's jobs share one process).
_BANNER_SHOWN = False


@rank_zero_only
def announce_offline(
    reason: str, run_dir: Path, sweep_dir: str | None = None, loud: bool = True
) -> None:
    """A log record naming the run folder and the command to sync it (a warning when ``loud``:
    the run went offline without being asked to) and, on a terminal, once per process, a
    banner on stderr saying the same: a log file gets the record alone, and a sweep's later
    jobs their own record."""
    global _BANNER_SHOWN
    every = f"{sweep_dir}/*/wandb/offline-run-*" if sweep_dir else None
    log.log(
        logging.WARNING if loud else logging.INFO,
        "W&B is logging OFFLINE (%s); upload this run later with: wandb sync %s%s",
        reason,
        run_dir,
        f" (every job of this sweep: wandb sync {every})" if every else "",
    )
    if _BANNER_SHOWN or not sys.stderr.isatty():
        return
    _BANNER_SHOWN = True
    lines = [
        f"W&B is logging OFFLINE: {reason}.",
        f"This run is saved in {run_dir}",
        "Upload it later (from a machine with internet and `wandb login`) with:",
        f"    wandb sync {run_dir}",
    ]
    if every:
        lines.append(f"Every job of this sweep: wandb sync {every}")
    lines.append("To log online: `wandb login` or export WANDB_API_KEY=<key>.")
    try:
        from rich.console import Console

        # No panel: its borders would crop or break the paths that users copy.
        console = Console(stderr=True)
        console.rule("W&B offline", style="bold yellow")
        for i, line in enumerate(lines):
            style = "bold yellow" if i == 0 else ("bold" if "wandb sync" in line else None)
            console.print(line, style=style, soft_wrap=True, markup=False, highlight=False)
        console.rule(style="bold yellow")
    except Exception:  # rich missing or broken: plain text
        rule = "=" * 88
        sys.stderr.write("\n".join(["", rule, *lines, rule, ""]) + "\n")
        sys.stderr.flush()


def wandb_logger(
    project: str = "covidqu",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    log_model: bool | str = False,
    job_type: str = "train",
    notes: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A :class:`WandbLogger` for this job of a run or sweep; offline without credentials.

    Args:
        project: the W&B project.
        entity: the W&B user or team (``None``: the default of the API key).
        group: the run group; ``None``: the sweep (see :func:`default_group_and_name`).
        name: the run name; ``None``: the overrides that distinguish the job.
        tags: run tags.
        save_dir: where ``wandb/`` is written; ``None``: the Hydra run folder.
        offline: ``True`` forces offline; ``None`` or ``False``: online when an API key is
            found (``WANDB_API_KEY`` or netrc), else offline with a warning. Never prompts.
        log_model: ``True`` logs the best and last checkpoints as an artifact when training
            ends (``"all"``: every checkpoint as it is saved). Offline, the artifact is recorded
            in the run and uploaded by ``wandb sync``.
        job_type: the W&B job type.
        notes: a longer description of the run.
        **kwargs: passed on to ``wandb.init`` (e.g. ``id``, ``resume``, ``settings``).
    """
    hc = _hydra()
    if hc is not None and _multirun(hc):
        _finish_previous_job()
    default_group, default_name = default_group_and_name(hc)
    save_dir = Path(save_dir if save_dir not in (None, "") else _run_folder(hc))
    save_dir.mkdir(parents=True, exist_ok=True)
    asked = str(kwargs.pop("mode", "") or "").lower()  # wandb.init's own mode, if given
    mode, reason = choose_mode(offline or asked in ("offline", "dryrun"))
    if asked == "disabled":
        mode, reason = "disabled", None
    if mode == "disabled":
        log.info("W&B is disabled (WANDB_MODE=disabled): nothing is logged to it")
    elif reason:
        _note_offline(reason, save_dir)
    sweep_dir = str(hc.sweep.dir) if hc is not None and _multirun(hc) else None
    # W&B's own lines: offline, where the run is and how to sync it, which the announcement
    # says (silent); online, its run history at the end (quiet keeps the run's address).
    kwargs.setdefault("settings", {"silent": True} if mode == "offline" else {"quiet": True})
    return CXRWandbLogger(
        project=project,
        entity=entity,
        group=group if group is not None else default_group,
        name=name if name is not None else default_name,
        tags=list(tags) if tags else None,
        save_dir=str(save_dir),
        offline=False,  # the mode is passed to wandb.init; Lightning's flag refuses log_model
        log_model=log_model,
        job_type=job_type,
        notes=notes,
        mode=mode,
        offline_reason=reason if mode == "offline" else None,
        offline_requested=bool(offline)
        or asked in ("offline", "dryrun")
        or os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun"),
        sweep_dir=sweep_dir,
        **kwargs,
    )


def _finish_previous_job() -> None:
    # A run still open when a multirun job starts is the previous job's (its end was missed):
    # Lightning would log this job into it.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.warning("finishing the W&B run of the previous job, which was left open")
        wandb.finish()


@rank_zero_only
def _note_offline(reason: str, save_dir: Path) -> None:
    # What a user acts on (the warning, with the exact `wandb sync` command) comes when the
    # run starts and its folder is known.
    log.debug("W&B will log offline into %s/wandb/ (%s)", save_dir, reason)
