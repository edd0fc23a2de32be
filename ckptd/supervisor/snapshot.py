"""What `ckptd status` is served: the run's status as the loop last published it, and its recent events.

The loop publishes an immutable snapshot of :meth:`Supervisor.status` whenever it writes state.json and
when a client asks, and notes every journal record it appends in a bounded list; the control socket's
``status`` answer is those two, so nothing reads the journal or talks to the supervisor's own socket to
answer it. The list starts with the tail of the journal of earlier `ckptd run`s of the same directory.

    >>> board = StatusBoard(recent=2)
    >>> for i in range(3):
    ...     board.note({"event": "spawn", "pid": i})
    >>> snap = board.publish({"state": "running", "last_exit": {"code": 1}})
    >>> snap["last_exit"]["code"], [e["pid"] for e in board.recent()]
    (1, [1, 2])
    >>> snap["state"] = "stopped"
    Traceback (most recent call last):
    TypeError: 'mappingproxy' object does not support item assignment
"""

from __future__ import annotations

import collections
import json
import os
import stat
import types
from collections.abc import Mapping
from typing import Any

RECENT = 32  # journal records kept for `ckptd status` (it shows the last 8)
SEED_BYTES = 64 << 10  # of the journal's end read at start for the records of earlier runs


class StatusBoard:
    def __init__(self, recent: int = RECENT) -> None:
        self._snapshot: Mapping[str, Any] = types.MappingProxyType({})
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)

    def publish(self, status: dict[str, Any]) -> Mapping[str, Any]:
        """Replace the snapshot by a frozen copy of ``status`` (JSON values: nested dicts and lists frozen too)."""
        self._snapshot = _freeze(status)
        return self._snapshot

    @property
    def snapshot(self) -> Mapping[str, Any]:
        return self._snapshot

    def note(self, record: dict[str, Any]) -> None:
        """A journal record was appended (the newest pushes the oldest out)."""
        self._recent.append(record)

    def recent(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._recent]

    def serve(self, status: dict[str, Any]) -> dict[str, Any]:
        """The ``status`` answer: ``status`` published, with the recent events (plain JSON values)."""
        self.publish(status)
        return {**_thaw(self._snapshot), "recent_events": self.recent()}

    def seed(self, journal_path: str) -> None:
        """Start the recent events with the end of the journal (earlier `ckptd run`s); bounded, never raises."""
        try:
            fd = os.open(journal_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            start = max(0, st.st_size - SEED_BYTES)
            data = os.pread(fd, SEED_BYTES, start)
        except OSError:
            return
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first line is cut
        for line in lines:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn or empty line
            if isinstance(record, dict):
                self.note(record)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value
