"""Errors a user can fix, and how the commands report them.

An error caused by what a user handed us (a config value, a data tree, a checkpoint, a weights
file, an image) is a :class:`UserError`. Its message names the key or file and says what to do;
the commands print it without a traceback and exit with its ``exit_code`` (2 unless it says
otherwise). Any other exception is a fault of covidqu itself and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, with a message that names the config key or file and the fix."""

    #: The process's exit status when a command stops on this error.
    exit_code: int = 2


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot work, with the keys to change."""


class DataError(UserError):
    """Bad or missing data, with a message that names the path and the fix."""


class CheckpointError(UserError, ValueError):
    """A file that is not a usable covidqu checkpoint, or one that may not be loaded safely."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by a config key or argument does not exist."""


class RunInterrupted(UserError):
    """A run stopped by SIGTERM or Ctrl-C, with what it kept and the command that resumes it.

    Not bad input, but a stop the user (or a scheduler) asked for: it ends the command the same
    way, with a message and no traceback, and with the shell's status for the signal.
    """

    #: What the run folder's failure.txt says the run's status is.
    status = "interrupted"

    def __init__(self, message: str, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        #: 128 + the signal number, as a shell reports a process that a signal ended.
        self.exit_code = 143 if signal_name == "SIGTERM" else 130
