"""Exceptions that mean "the user asked for something we cannot do".

Library code raises :class:`UsageError` for bad input (a missing data file, an
unknown optimizer, a corrupted checkpoint, ...). The CLI turns it into one line
``nograd: error: ...`` on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A user error with a one-line, actionable message."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (its type's name when
    it has no message): what a one-line error shows of a library's long one."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class RunAborted(Exception):
    """A run that had to stop for a reason outside the user's input: a process of a distributed
    run died or hung, or the processes' weights diverged. The message says what happened and how to
    go on (usually: resume from the last checkpoint). The CLI prints it as one line and exits 1.

    ``exit_now``: the process group is broken (a peer is gone), so its background threads cannot
    be shut down cleanly; the CLI then leaves with ``os._exit`` rather than a normal exit."""

    def __init__(self, message: str, exit_now: bool = False) -> None:
        super().__init__(message)
        self.exit_now = exit_now
