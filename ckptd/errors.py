"""The errors a user can cause. Each names the problem and the fix.

The CLI turns a :class:`CkptdError` into one line on stderr and its
``exit_code``; anything else is a bug and raises normally.
"""

from __future__ import annotations

from . import exitcodes


class CkptdError(Exception):
    """Base class of errors caused by input, environment or storage."""

    exit_code: int = exitcodes.FAILURE


class ConfigError(CkptdError):
    """A configuration file or option is wrong (names the key and the fix)."""

    exit_code = exitcodes.CONFIG


class NotFoundError(CkptdError):
    exit_code = exitcodes.NOT_FOUND


class CorruptCheckpointError(CkptdError):
    """A checkpoint failed verification; ``reason`` says which file and why."""

    exit_code = exitcodes.INVALID

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StorageError(CkptdError):
    """A write, fsync, close or rename failed; the operation was aborted and nothing published."""

    exit_code = exitcodes.STORAGE

    def __init__(self, path: str, op: str, cause: BaseException) -> None:
        detail = getattr(cause, "strerror", None) or str(cause)
        code = getattr(cause, "errno", None)
        import errno as _errno

        name = _errno.errorcode.get(code, "") if code else ""
        super().__init__(
            f"{op} failed for {path}: {name + ' ' if name else ''}{detail}; "
            "the checkpoint was aborted and earlier checkpoints are untouched"
        )
        self.path = path
        self.op = op
        self.errno = code


class UnsupportedStateError(CkptdError):
    """Training state holds a value ckptd cannot store without pickle."""


class LockedError(CkptdError):
    exit_code = exitcodes.LOCKED


class NotRunningError(CkptdError):
    exit_code = exitcodes.NOT_RUNNING
