"""The run's event journal (``<root>/.ckptd/journal.jsonl``) and state snapshot (``state.json``).

The journal is append-only JSON lines, flushed and fsynced per event, so it survives a crash or
restart of the supervisor and feeds ``ckptd status``. Events: start, spawn, resumed, checkpoint,
checkpoint_removed, checkpoint_invalid, notice, stop_requested, exit, restart, give_up, end.
The state file is rewritten atomically (temp, fsync, rename, fsync dir) on every state change.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

JOURNAL_NAME = "journal.jsonl"
STATE_NAME = "state.json"
SOCKET_PATH_NAME = "control.path"  # holds the socket path when it is not <run dir>/control.sock
LOCK_NAME = "lock"


class Journal:
    def __init__(self, path: str, clock_time) -> None:
        self.path = path
        self._time = clock_time
        self._f = open(path, "a", encoding="utf-8")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(self._time(), 3), "event": event, **fields}
        self._f.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        self._f.close()


def read_journal(path: str) -> Iterator[dict[str, Any]]:
    """Yield the journal's events; a torn last line (crash mid-write) is skipped."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None
