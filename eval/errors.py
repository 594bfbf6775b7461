"""The suite's error convention: errors a user can fix, and errors that are bugs.

A `UserError` is caused by what the user gave or the machine they run on (a config key, a missing,
foreign or damaged file, data, a non-finite loss, a busy run folder): the CLI prints it as ONE line,
`tfd <cmd>: error: <message>`, and exits non-zero; the message names the file or key, what was
expected and what was found. Every other exception is a bug and keeps its traceback (`tfd --debug`
shows tracebacks for user errors too).

`UserError` subclasses `ValueError`, so callers (and tests) that caught `ValueError` for bad input
keep working.
"""
from __future__ import annotations

import errno
import os
from typing import Any


class UserError(ValueError):
    """An error the user can fix; its message is one line naming the cause (file, key, value)."""


class BadFile(UserError):
    """A file that cannot be used: unreadable, truncated, foreign, of the wrong layout or values.

    `BadFile(path, problem)` or with `key` (the array / key / tensor inside the file), `expected` and
    `found`: the message reads `<path>: <key>: <problem>: expected <expected>, found <found>`;
    `hint` (what to do) is appended. Attributes keep the parts for programs."""

    def __init__(self, path: str | os.PathLike, problem: str, *, key: str | None = None, expected: Any = None,
                 found: Any = None, hint: str | None = None):
        self.path, self.key, self.problem, self.expected, self.found, self.hint = \
            str(path), key, problem, expected, found, hint
        msg = f"{path}: " + (f"{key}: " if key else "") + problem
        if expected is not None:
            msg += f": expected {expected}"
            if found is not None:
                msg += f", found {found}"
        elif found is not None:
            msg += f" ({found})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class RunBusy(UserError):
    """A run folder is locked by another live process (the message names the holder)."""


# errno values that mean "the machine, not the program": shown as one line by the CLI
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS,
               errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def is_user_error(e: BaseException) -> bool:
    """True for errors the CLI reports on one line: `UserError`, and `OSError`s whose errno is a file
    system condition (missing file, permission, disk full, file too large, quota, read-only), however
    raised (`FileNotFoundError("...")` without an errno too)."""
    if isinstance(e, (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(e, OSError) and e.errno in USER_ERRNOS


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (OSError: `<strerror>: <filename>`; newlines of multi-problem
    messages kept as `; `)."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return "; ".join(s.strip(" -") for s in str(e).splitlines() if s.strip()) or type(e).__name__
