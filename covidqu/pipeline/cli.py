"""How the commands end on bad input: the message, no traceback, a non-zero status."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException

from covidqu.errors import UserError

log = logging.getLogger("covidqu")

T = TypeVar("T")


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``err``: itself, or the one Hydra's instantiate wrapped."""
    if isinstance(err, UserError):
        return err
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, UserError):
        return err.__cause__
    return None


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
