"""Restart policy: classify an exit, then decide restart-after-delay or give up. Pure; the clock is passed in.

- Backoff grows exponentially with jitter: ``min(cap, base * 2**(n-1))``, the upper half randomised
  ("equal jitter"), where n counts failures since training last made progress.
- Budget: at most ``max_restarts`` restarts within ``window`` seconds. Progress (a step beyond the
  highest step reached before the last restart) refills the budget and resets the backoff.
- The same step crashing ``same_step_limit`` times in a row gives up at once.
- A script that fails ``start_failure_limit`` times in a row before its first completed step (an
  import error, a bad argument, a missing file) gives up at once: no backoff can fix it.
"""

from __future__ import annotations

import collections
import enum
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, TypeGuard

from .. import exitcodes


def is_step(v: Any) -> TypeGuard[int]:
    """A step number as a trainer reports it: an int >= 0 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Reason(enum.Enum):
    FINISHED = "finished"  # exit 0
    PREEMPTED = "preempted"  # exit 85: stopped with an emergency checkpoint
    STOPPED = "stopped"  # exited after a stop we asked for (other code / signal)
    ERROR = "error"  # non-zero exit code
    SIGNAL = "signal"  # killed by a signal we did not send
    OOM = "oom"  # SIGKILL we did not send, while the kernel counted an OOM kill
    HANG = "hang"  # no heartbeat for hang_timeout; we killed it
    NO_RESTART = "no_restart"  # an exit code listed as "do not restart"


@dataclass(frozen=True)
class ExitStatus:
    """How the child's main process ended: exactly one of ``code`` / ``signal`` is set."""

    pid: int
    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait(cls, pid: int, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(pid, signal=os.WTERMSIG(status))
        return cls(pid, code=os.WEXITSTATUS(status))

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exit code {self.code}"


@dataclass(frozen=True)
class Outcome:
    reason: Reason
    detail: str


def classify(status: ExitStatus, *, stop_requested: bool, hang: bool, we_killed: bool,
             oom_kills: int, no_restart: frozenset[int], system_oom_kills: int = 0) -> Outcome:
    """Name why the child ended.

    ``oom_kills``: OOM kills our memory cgroup counted while it ran; ``system_oom_kills``: OOM kills
    anywhere on the machine meanwhile (/proc/vmstat). A SIGKILL nobody counted is not called an OOM.
    """
    what = status.describe()
    if status.code == 0:
        return Outcome(Reason.FINISHED, what)
    if hang:
        return Outcome(Reason.HANG, f"{what} after no heartbeat (hang)")
    if status.code == exitcodes.PREEMPTED:
        return Outcome(Reason.PREEMPTED, what + " (emergency checkpoint committed)")
    if stop_requested:
        return Outcome(Reason.STOPPED, what + " after a stop request")
    if status.code is not None and (status.code in no_restart or status.code == exitcodes.CONFIG):
        return Outcome(Reason.NO_RESTART, what + " (listed as do-not-restart)")
    if status.signal == signal.SIGKILL and not we_killed:
        if oom_kills > 0:
            return Outcome(Reason.OOM, what + ": out of memory (cgroup oom_kill)")
        if system_oom_kills > 0:
            return Outcome(Reason.OOM, what + " while the kernel's OOM killer ran: perhaps out of memory")
        return Outcome(Reason.SIGNAL, what + " from outside (not by ckptd, and no OOM kill was counted)")
    if status.signal is not None:
        return Outcome(Reason.SIGNAL, what)
    return Outcome(Reason.ERROR, what)


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay: float = 0.0
    why: str = ""


class RestartPolicy:
    def __init__(self, *, max_restarts: int, window: float, base: float, cap: float, same_step_limit: int,
                 start_failure_limit: int = 3, rng: random.Random | None = None) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.base = base
        self.cap = cap
        self.same_step_limit = same_step_limit
        self.start_failure_limit = start_failure_limit
        self._start_failures = 0  # consecutive lives that ended before their first step
        self._rng = rng or random.Random()
        self._restarts: collections.deque[float] = collections.deque()
        self._failures = 0  # failures since the last progress: the backoff exponent
        self._crash_step: int | None = None
        self._same_step = 0
        self._high_water: int | None = None  # highest step seen before the last restart
        self._seen: int | None = None  # highest step seen so far

    def observe_step(self, step: int) -> bool:
        """Record a step the trainer reached; return True when it is new progress (budget refilled)."""
        if self._seen is None or step > self._seen:
            self._seen = step
        if self._failures and (self._high_water is None or step > self._high_water):
            self._restarts.clear()
            self._failures = 0
            self._same_step = 0
            self._crash_step = None
            return True
        return False

    def on_failure(self, now: float, step: int | None, *, before_first_step: bool = False) -> Decision:
        """The child failed at ``step`` (None: unknown). Restart after a delay, or give up.

        ``before_first_step``: that life ended before completing a step (see the loop for the rule).
        """
        self._start_failures = self._start_failures + 1 if before_first_step else 0
        if before_first_step and self._start_failures >= self.start_failure_limit:
            return Decision(False, why=f"the script failed {self._start_failures} times in a row before its "
                                       "first step; fix the error above and run again")
        if step is not None and (self._seen is None or step > self._seen):
            self._seen = step
        if step is not None and step == self._crash_step:
            self._same_step += 1
        else:
            self._crash_step, self._same_step = step, 1
        if step is not None and self._same_step >= self.same_step_limit:
            return Decision(False, why=f"step {step} crashed {self._same_step} times in a row")
        while self._restarts and self._restarts[0] <= now - self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return Decision(False, why=f"restart budget spent: {self.max_restarts} restarts "
                                       f"within {self.window:g} s without progress")
        self._restarts.append(now)
        self._failures += 1
        self._high_water = self._seen
        return Decision(True, delay=self.backoff(self._failures))

    def backoff(self, n: int) -> float:
        delay = min(self.cap, self.base * 2 ** min(n - 1, 62))
        return delay / 2 + self._rng.uniform(0, delay / 2)

    @property
    def restarts_in_window(self) -> int:
        return len(self._restarts)
