"""One readable line per event on stderr (``text``), or one JSON object per line (``json``).

Every value that reaches a log line can come from someone else: the command line, ``--dir``, a cloud
metadata answer, a trainer's report. So the text format escapes control characters in the whole
message (``\\n``, ``\\x1b``, ...): one event is one line, and no value can start a line of its own or
send terminal escapes. What is meant to span lines (a traceback, a hung trainer's stacks, the script's
last stderr lines) is passed as ``lines``: each printed escaped, on its own line, indented, so a line
that starts with a timestamp is always a record of ours. JSON escapes by itself.

:func:`redact_argv` hides the values of options named like secrets before a command line is logged or
journaled (docs/supervisor.md, "What the log and the journal show").
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from ..origin import REDACTED, SECRET_NAME, redact_argv  # noqa: F401  (one rule for logs and manifests)

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators some viewers break lines at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
CONTINUATION = "    | "  # prefix of the lines of a multi-line block (tracebacks, stacks, stderr tails)


def escape(text: Any) -> str:
    """``text`` with every control character written as an escape: it stays on one line and sends nothing
    to a terminal."""
    return _CONTROL.sub(_escape_char, str(text))


def _escape_char(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


class EventLog:
    def __init__(self, fmt: str = "text", stream: TextIO | None = None, clock_time=time.time) -> None:
        self.fmt = fmt
        self._stream = stream or sys.stderr
        self._time = clock_time
        self._pid = os.getpid()

    def __call__(self, level: str, event: str, msg: str, *, lines: Sequence[Any] = (), **fields: Any) -> None:
        now = self._time()
        if self.fmt == "json":
            text = "\n".join([str(msg), *(str(x) for x in lines)])
            line = json.dumps({"time": round(now, 3), "level": level, "event": event, "msg": text,
                               "pid": self._pid, **fields}, default=str, separators=(",", ":"))
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            line = f"{stamp} ckptd[{self._pid}] {level}: {escape(msg)}"
            line += "".join(f"\n{CONTINUATION}{escape(x)}" for x in lines)
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: the journal still has the event
