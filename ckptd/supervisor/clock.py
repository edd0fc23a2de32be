"""The supervisor's clock: tests replace it instead of sleeping."""

from __future__ import annotations

import time


class Clock:
    """Monotonic time for deadlines, wall time for records."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class FakeClock(Clock):
    """A clock that moves only when told to (``advance``)."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall - start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self.now += seconds
