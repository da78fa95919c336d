"""Exceptions that mean "the user asked for something we cannot do".

Library code raises :class:`UsageError` for bad input (a missing data file, an
unknown optimizer, a corrupted checkpoint, ...). The CLI turns it into one line
``nograd: error: ...`` on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A user error with a one-line, actionable message."""
