"""The emergency stop's two helpers: the deadline rule (:class:`SaveTimes`) and the stop watch (:class:`StopWatch`).

The Checkpointer writes the emergency checkpoint at a safe point (``ck.step()``, ``ck.poll()``, an epoch's
end); these decide whether it fits before the stop's deadline, and say when a stop waits for a safe point.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

# The deadline rule: start the save only when the time left before the deadline is at least the longest of
# the last EMERGENCY_HISTORY durable saves x EMERGENCY_FACTOR + EMERGENCY_MARGIN seconds.
EMERGENCY_HISTORY = 3
EMERGENCY_FACTOR = 1.5
EMERGENCY_MARGIN = 1.0

# A stop that has waited this long for a safe point (ck.step(), ck.poll(), the end of an epoch of
# ck.epochs()) is reported once, with the script's line it waits in: a loop there needs ck.poll().
STOP_WAIT_WARN_SECONDS = 3.0
STOP_WATCH_INTERVAL = 0.25


class SaveTimes:
    """What the last durable saves of this process took when nobody paced them (snapshot + persist, less the
    pauses): the emergency stop's estimate of what a save of this state costs."""

    def __init__(self) -> None:
        self.recent: list[float] = []

    def record(self, seconds: float) -> None:
        self.recent.append(round(seconds, 6))
        del self.recent[:-EMERGENCY_HISTORY]

    def estimate(self) -> float | None:
        """The longest of the recent saves x EMERGENCY_FACTOR + EMERGENCY_MARGIN; None before the first."""
        return max(self.recent) * EMERGENCY_FACTOR + EMERGENCY_MARGIN if self.recent else None

    def too_late(self, step: int, left: float, kept: str) -> str | None:
        """Why the emergency checkpoint of ``step`` must not be started with ``left`` seconds before the
        deadline (``kept``: the checkpoint the run keeps instead), or None when it fits."""
        estimate = self.estimate()
        need = EMERGENCY_MARGIN if estimate is None else estimate
        if left >= need:
            return None
        how = (f"about {need:.1f} s (the longest of the last {len(self.recent)} saves x "
               f"{EMERGENCY_FACTOR:g} + {EMERGENCY_MARGIN:g} s)" if estimate is not None else
               f"at least {need:g} s (no save of this run to estimate from)")
        return (f"not starting the emergency checkpoint of step {step}: {max(left, 0.0):.1f} s left before the "
                f"deadline, a save needs {how}; the last committed checkpoint ({kept}) is kept")


class StopWatch:
    """Reports, once, a stop that waits for a safe point: the loop is in code that calls neither ck.step() nor
    ck.poll() (an evaluation loop, a long data setup). Its thread reads flags only.

    ``pending()``: whether a stop waits (None: stop watching, e.g. several ranks, where a stop waits for the
    next agreement step by design). ``warn(message, seconds, where)``: how it reports.
    """

    def __init__(self, pending: Callable[[], bool | None], warn: Callable[..., None]) -> None:
        self._pending, self._warn = pending, warn
        self.seen: float | None = None  # when the watch first saw a stop pending
        self.warned = False
        self.loop_thread: int | None = None  # the thread of the last safe point: where the script waits
        self._closed: threading.Event | None = None

    @property
    def started(self) -> bool:
        return self._closed is not None

    def start(self) -> None:
        self._closed = threading.Event()
        threading.Thread(target=self._run, args=(self._closed,), name="ckptd-stop-watch", daemon=True).start()

    def close(self) -> None:
        if self._closed is not None:
            self._closed.set()

    def _run(self, closed: threading.Event) -> None:
        while not closed.wait(STOP_WATCH_INTERVAL):
            pending = self._pending()
            if pending is None:
                return
            if not pending:
                continue
            now = time.monotonic()
            if self.seen is None:
                self.seen = now
            waited = now - self.seen
            if self.warned or waited < STOP_WAIT_WARN_SECONDS:
                continue
            self.warned = True
            where = script_location(sys._current_frames().get(self.loop_thread or 0))
            msg = (f"a stop has waited {waited:.1f} s for a safe point: the script is in {where}, which calls neither "
                   "ck.step() nor ck.poll(); call ck.poll() in that loop (e.g. once per evaluation batch) so a stop "
                   "is handled there (it saves the last step's state and RNG streams)")
            self._warn(msg, seconds=round(waited, 3), where=where)

    def reached(self) -> None:
        """A stop reached a safe point: say how long it waited, when the watch reported it; the watch says
        nothing more (the emergency save that follows may take seconds: that is not a wait for a safe point)."""
        seen, warned = self.seen, self.warned
        self.warned = True
        if seen is None or not warned:
            return
        waited = time.monotonic() - seen
        self._warn(f"the stop reached a safe point after waiting {waited:.1f} s", seconds=round(waited, 3),
                   reached=True)


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, threading) if m.__file__)


def script_location(frame: Any) -> str:
    """``file:line in function`` of the innermost frame of the script (not torch, ckptd or the stdlib), and
    of the script's frame that called it."""
    own = os.path.dirname(os.path.abspath(__file__)) + os.sep
    found: list[str] = []
    while frame is not None and len(found) < 2:
        fname = frame.f_code.co_filename
        if not fname.startswith((own, *_LIBRARY_DIRS)) and not fname.startswith("<"):
            found.append(f"{fname}:{frame.f_lineno} in {frame.f_code.co_name}()")
        frame = frame.f_back
    return ", called from ".join(found) or "code outside the script"
