"""The run's event journal (``<root>/.ckptd/journal.jsonl``) and state snapshot (``state.json``).

The journal is append-only JSON lines, flushed and fsynced per event, so it survives a crash or
restart of the supervisor and feeds ``ckptd status``. Events: start, spawn, resumed, checkpoint,
checkpoint_removed, checkpoint_invalid, notice, stop_requested, exit, restart, give_up, end.
The state file is rewritten atomically on every state change, through the store's writer (temp, fsync,
rename, fsync dir).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from .. import store
from ..errors import CkptdError

JOURNAL_NAME = "journal.jsonl"
STATE_NAME = "state.json"
SOCKET_PATH_NAME = "control.path"  # holds the socket path when it is not <run dir>/control.sock
LOCK_NAME = "lock"
MAX_STATE_BYTES = 64 << 20  # state.json and job.json are a few KiB


class Journal:
    """Append-only; a storage error drops the event (counted, logged once per outage), never raises.

    Each event is one ``write`` of a whole line on an O_APPEND descriptor, then fsync. After a failed
    write or fsync the file may end in a torn line; the next event starts on a fresh line so readers
    skip only the torn one. The first event after an outage is ``journal_gap`` with the count dropped.
    """

    def __init__(self, path: str, clock_time, on_error: Callable[..., None] | None = None) -> None:
        self.path = path
        self._time = clock_time
        self._on_error = on_error
        self.dropped = 0  # events lost to storage errors during the current outage
        self.dropped_total = 0
        self._torn = False
        self._fd: int | None = store.open_at(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600,
                                            check=store.private_dir)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(self._time(), 3), "event": event, **fields}
        if self.dropped and self._write({"time": record["time"], "event": "journal_gap", "dropped": self.dropped}):
            if self._on_error:
                self._on_error("info", "journal", f"journal writable again; {self.dropped} event(s) were dropped")
            self.dropped = 0
        if not self._write(record):
            self.dropped += 1
            self.dropped_total += 1
        return record

    def _write(self, record: dict[str, Any]) -> bool:
        if self._fd is None:
            return False
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        if self._torn:
            line = "\n" + line
        try:
            data = line.encode()
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write (disk full?)")
            os.fsync(self._fd)
        except OSError as exc:
            self._torn = True
            if self.dropped == 0 and self._on_error:
                self._on_error("warning", "journal", f"cannot write the journal {self.path} "
                               f"({exc.strerror or exc}); events are dropped and counted until it recovers")
            return False
        self._torn = False
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_journal(path: str) -> Iterator[dict[str, Any]]:
    """Yield the journal's events; a torn last line (crash mid-write) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
    except OSError:
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return
    with open(fd, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                yield record


def write_text_atomic(path: str, text: str, mode: int = 0o600,
                      check: store.DirCheck | None = store.private_dir) -> None:
    """The store's durable replacement (``store.replace_file``: temp beside ``path``, fsync, rename over it,
    fsync the directory; never seen half-written, never written through a link) with the run directory's rules.
    ``mode``: exact permissions of the result (umask ignored). ``check``: what the directory must be; by
    default the run directory's rule, ours alone, checked on the descriptor every write goes through, so a
    run directory swapped for a link or for another account's directory after the start is refused
    (PermissionError) rather than written into.
    """
    store.replace_file(path, text.encode("utf-8"), mode, check=check)


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(store.read_small(path, MAX_STATE_BYTES))
    except (OSError, ValueError, RecursionError, CkptdError):  # missing, unreadable, damaged, not a
        # regular file (a link or a FIFO: refused, never waited on): no previous state
        return None
    return data if isinstance(data, dict) else None
