"""The run directory ``<root>/.ckptd/``: owner-only, one supervisor at a time, where the socket is.

Unix socket paths are limited to 107 bytes; when ``<run dir>/control.sock`` is longer, the socket
goes in a 0700 directory under ``$XDG_RUNTIME_DIR`` (or ``/tmp``) and its real path is recorded in
``<run dir>/control.path`` for clients.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile

from .. import protocol
from ..errors import ConfigError, LockedError, NotRunningError
from .journal import LOCK_NAME, SOCKET_PATH_NAME, write_text_atomic

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL


def ensure_run_dir(root: str) -> str:
    """Create ``root`` and its 0700 run directory; refuse one owned by someone else."""
    path = protocol.run_dir(root)
    try:
        os.makedirs(root, exist_ok=True)
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the checkpoint directory {root}: {exc.strerror}; "
                          "check --dir and its permissions") from None
    _check_private_dir(path)
    return path


def _check_private_dir(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigError(f"{path} is not a directory owned by uid {os.getuid()}; remove it or pick another --dir")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run dir>/lock``, holding the owner's pid. Freed by the kernel on death."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            owner = _read_pid(self.path)
            root = os.path.dirname(os.path.dirname(self.path))
            raise LockedError(f"another `ckptd run` (pid {owner or '?'}) already supervises {root}; "
                              f"stop it with `ckptd stop --dir {root}` or use another --dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def supervisor_pid(root: str) -> int | None:
    """Pid of the supervisor holding ``root``'s lock, or None when none runs."""
    path = os.path.join(protocol.run_dir(root), LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(path) or -1
    finally:
        os.close(fd)
    return None


def choose_socket_path(root: str) -> str:
    """Where this run's socket goes; records a fallback location in the run directory."""
    run_dir = protocol.run_dir(root)
    record = os.path.join(run_dir, SOCKET_PATH_NAME)
    default = protocol.default_socket_path(root)
    if len(os.fsencode(default)) <= SUN_PATH_MAX:
        if os.path.exists(record):
            os.unlink(record)
        return default
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.access(base, os.W_OK):
        base = tempfile.gettempdir()
    private = os.path.join(base, f"ckptd-{os.getuid()}-{digest}")
    os.makedirs(private, mode=0o700, exist_ok=True)
    _check_private_dir(private)
    path = os.path.join(private, protocol.SOCKET_NAME)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"no usable control socket path: {path} is over {SUN_PATH_MAX} bytes; "
                          "set XDG_RUNTIME_DIR to a short directory")
    write_text_atomic(record, path + "\n")
    return path


def find_socket_path(root: str) -> str:
    """The control socket of ``root``'s supervisor; NotRunningError when there is none."""
    if supervisor_pid(root) is None:
        raise NotRunningError(f"no `ckptd run` is supervising {os.path.abspath(root)} "
                              "(wrong --dir? start one with `ckptd run --dir DIR script.py`)")
    try:
        with open(os.path.join(protocol.run_dir(root), SOCKET_PATH_NAME)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return protocol.default_socket_path(root)
