"""Errors that the CLI turns into clear messages and exit codes.

`UserError` and its subclasses are the user's to fix (bad config, bad data): exit code 2, no traceback.
Anything else is ours or the machine's: exit code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave us (config or data). The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config that cannot describe a run. The message names the file, line, field path and what is allowed."""


class DataError(UserError):
    """A data record we cannot use. The message names the file, record index and the reason."""

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.source = source
        self.index = index
        self.reason = reason


class RunFailed(Exception):
    """A run that cannot go on, for a reason the message states in full (e.g. the NaN guard gave up, a
    checkpoint no longer verifies). The CLI prints the message without a traceback and exits 1."""

    exit_code = 1


class CheckpointError(RunFailed):
    """A checkpoint that cannot be written or read (full disk, corrupt or truncated files, a file that would
    need unpickling). The message names the file and why; the CLI prints it and exits 1."""
