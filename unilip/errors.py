"""The mistakes a user can fix, as one family: every command-line tool prints them as one line.

A wrong path, a broken or truncated file, a config that cannot work, data in which nothing can
be read: each is raised as a `UserError` (or an `OSError`, which the tools treat the same way)
whose message names the problem and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of the errors a user causes and can fix; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message names the key, the bad value and the fix."""


class UnreadableFileError(UserError, OSError):
    """A file that exists but cannot be read as what it should be (truncated, wrong format)."""


# What the command-line tools report as `error: <message>` (and exit non-zero) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (some libraries' messages span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
