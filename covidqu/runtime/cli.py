"""The commands' entry points, and how they end on bad input: the message, no traceback, a
non-zero status.

:func:`command` turns a command's task function into its ``python -m covidqu.<command>`` entry
point: Hydra composes ``conf/<command>.yaml`` with the command line, and every error a user can
fix (a :class:`UserError`, a constructor refusing a config value, a mistyped group option or
key) ends with ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)

from covidqu.errors import ConfigError, UserError
from covidqu.runtime.quiet import quiet_third_party

log = logging.getLogger("covidqu")

T = TypeVar("T")


def _bad_argument() -> tuple[type[Exception], ...]:
    """Errors that a constructor raises for a bad argument: where Hydra's instantiate meets one,
    a config value was wrong (Hydra's message names its key)."""
    # Imported on use: every entry point imports this module, and Lightning loads torch.
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, TypeError, KeyError, MisconfigurationException)


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``err``: itself, the one Hydra's instantiate wrapped, or a
    bad constructor argument that instantiate met (a :class:`ConfigError` with Hydra's text)."""
    if isinstance(err, UserError):
        return err
    if isinstance(err, InstantiationException):
        if isinstance(err.__cause__, UserError):
            return err.__cause__
        if isinstance(err.__cause__, _bad_argument()):
            return ConfigError(f"{err} (check the config keys under it)")
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise what :func:`user_error` finds in the block as that user error."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if found is None or found is err:
            raise
        raise found from err


def report(err: UserError) -> None:
    """Print ``err`` for the user (stderr) and into the run's log files."""
    text = str(err)
    print(f"error: {text}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the run's <job>.log; the terminal has it
            handler.handle(log.makeRecord(log.name, logging.ERROR, "", 0, text, None, None))


def reports_errors(task: Callable[[Any], T]) -> Callable[[Any], T]:
    """Wrap a command's task function: a :class:`UserError` ends the process with its message
    and ``exit_code``, and no traceback; anything else propagates as it is."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> T:
        try:
            return task(cfg)
        except Exception as err:
            found = user_error(err)
            if found is None:
                raise
            report(found)
            raise SystemExit(found.exit_code) from None

    return wrapper


#: The Hydra configs, ``conf/`` beside the package (an editable install from a clone reads them).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

#: What Hydra raises when the command line does not compose: an unknown group option
#: (``model=unett``), a key the config lacks (``trainer.max_epoch=1``), bad override syntax.
COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)


def composition_error(err: Exception) -> ConfigError:
    """Hydra's own account of a command line that does not compose, with its cause, as a
    :class:`ConfigError` that says where to look up the groups and keys."""
    # Hydra lists where it looked for configs after the options: the options say it all
    text = str(err).split("Config search path:")[0].strip()
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f"\n{str(cause).strip()}"
    return ConfigError(
        f"{text}\n(the groups and their options: --help; every key and its value: --cfg job)"
    )


def command(config_name: str) -> Callable[[Callable[[Any], T]], Callable[..., T]]:
    """Decorate a command's task function as its entry point (see the module docstring).

    Hydra prints a composition error itself and exits 1; with ``HYDRA_FULL_ERROR`` set (here,
    only while the command runs) it raises it instead, and the error is reported as covidqu
    reports bad input. A user who set ``HYDRA_FULL_ERROR=1`` gets Hydra's traceback.
    """

    def decorate(task: Callable[[Any], T]) -> Callable[..., T]:
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
        run = hydra_main(reports_errors(task))

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> T:
            quiet_third_party()  # notices a user cannot act on (runtime/quiet.py)
            asked = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return run(*args, **kwargs)
            except COMPOSITION_ERRORS as err:
                if asked == "1":
                    raise
                report(composition_error(err))
                raise SystemExit(2) from None
            except UserError as err:  # raised outside the task: by a sweeper, say
                report(err)
                raise SystemExit(err.exit_code) from None
            finally:
                if asked is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = asked

        return main

    return decorate
