"""How the commands end on bad input: the message, no traceback, a non-zero status."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hydra.errors import InstantiationException

from covidqu.errors import ConfigError, UserError

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
