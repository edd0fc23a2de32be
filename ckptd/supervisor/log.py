"""One readable line per event on stderr (``text``), or one JSON object per line (``json``)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO


class EventLog:
    def __init__(self, fmt: str = "text", stream: TextIO | None = None, clock_time=time.time) -> None:
        self.fmt = fmt
        self._stream = stream or sys.stderr
        self._time = clock_time
        self._pid = os.getpid()

    def __call__(self, level: str, event: str, msg: str, **fields: Any) -> None:
        now = self._time()
        if self.fmt == "json":
            line = json.dumps({"time": round(now, 3), "level": level, "event": event, "msg": msg,
                               "pid": self._pid, **fields}, default=str, separators=(",", ":"))
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            line = f"{stamp} ckptd[{self._pid}] {level}: {msg}"
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: the journal still has the event
