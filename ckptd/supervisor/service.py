"""What systemd hears from `ckptd run` (``Type=notify``): READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC.

The loop builds a :class:`ServiceView` and calls :meth:`Service.tick` from its timers; this module only
decides what to send and when, through the :class:`~ckptd.supervisor.notify.Notifier`. It never touches
the child.

* ``STATUS=`` is one line a person reads in ``systemctl status``: state, step, last checkpoint and its
  age, restarts. Sent when the state changes, else at most every :data:`STATUS_EVERY` seconds.
* ``WATCHDOG=1`` follows training progress, not the supervisor's liveness: while a trainer is connected
  and running, it is sent only if every trainer spoke within ``WATCHDOG_USEC`` (heartbeats come from
  ``ck.step()`` and ``ck.poll()``, the same signal ``hang_timeout`` uses). While the supervisor itself
  acts (starting, stopping, killing a hung trainer, backing off) it is sent on time: those phases end by
  the supervisor's own deadlines. A script that never connects is only watched for liveness.
  ``hang_timeout`` below ``WatchdogSec`` means ckptd's hang handling acts first (docs/systemd.md).
* ``EXTEND_TIMEOUT_USEC=`` while a stop's emergency checkpoint is being written: the bytes under the
  checkpoint directory's ``.tmp-*`` directories grow, a checkpoint lands or a trainer speaks. Each
  extension reaches :data:`STALL_SECONDS` past the last sign of progress, so a save that stalls longer
  still meets ``TimeoutStopSec``.

    >>> age_text(42), age_text(600), age_text(3 * 3600)
    ('42 s', '10 min', '3 h')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..store import TMP_PREFIX
from .notify import Notifier

STATUS_EVERY = 5.0  # seconds between STATUS refreshes when only the checkpoint's age changed
EXTEND_EVERY = 1.0  # seconds between looks for progress of a stop's emergency checkpoint
STALL_SECONDS = 10.0  # an extension lasts this long past the last sign of progress


@dataclass(frozen=True)
class ServiceView:
    """What the loop knows, as far as systemd is concerned (monotonic times unless named wall)."""

    state: str  # ChildState value
    step: int | None = None
    last_checkpoint: dict[str, Any] | None = None  # name, step, kind, time (wall)
    restarts: int = 0
    quiet_since: float | None = None  # the oldest last message of a connected trainer; None: none connected
    stop_reason: str | None = None
    stop_deadline: float | None = None  # when the grace (or hang grace) runs out
    hang: bool = False
    backoff_until: float | None = None
    exit_code: int | None = None
    exit_text: str = ""
    root: str = ""


class Service:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        interval = notifier.watchdog_interval
        self.watchdog_timeout = 2 * interval if interval else None  # WATCHDOG_USEC in seconds
        self._watchdog_due: float | None = None
        self._fed = True  # the last watchdog decision was "progressing"
        self._status = ""
        self._status_state = ""
        self._status_due = 0.0
        self._extend_due: float | None = None
        self._progress_mark: tuple | None = None
        self._last_progress: float | None = None

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def ready(self, view: ServiceView, now: float, wall: float) -> None:
        """The child was started: systemd's ``start`` returns now."""
        if self.watchdog_timeout:
            self._watchdog_due = now
        self._status = status_text(view, now, wall)
        self._status_state, self._status_due = view.state, now + STATUS_EVERY
        self.notifier.send("READY=1", f"STATUS={self._status}")

    def next_due(self) -> float | None:
        if not self.enabled:
            return None
        due = [t for t in (self._watchdog_due, self._extend_due, self._status_due) if t is not None]
        return min(due) if due else None

    def tick(self, view: ServiceView, now: float, wall: float) -> None:
        if not self.enabled:
            return
        self._tick_status(view, now, wall)
        self._tick_watchdog(view, now)
        self._tick_extend(view, now)

    def stopping(self, reason: str) -> None:
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({reason}): asking the trainer for an emergency checkpoint")

    def exited(self, code: int, why: str) -> None:
        self.notifier.send("STOPPING=1", f"STATUS=exited with {code}: {why}")

    # --- the three messages ---------------------------------------------------------------------

    def _tick_status(self, view: ServiceView, now: float, wall: float) -> None:
        if view.state == self._status_state and now < self._status_due:
            return
        text = status_text(view, now, wall)
        self._status_state, self._status_due = view.state, now + STATUS_EVERY
        if text != self._status:
            self._status = text
            self.notifier.send(f"STATUS={text}")

    def _tick_watchdog(self, view: ServiceView, now: float) -> None:
        if self.watchdog_timeout is None or self._watchdog_due is None:
            return
        fed = self.progressing(view, now)
        if (fed and not self._fed) or now >= self._watchdog_due:  # progress came back: say so at once
            if fed:
                self.notifier.send("WATCHDOG=1")
            self._watchdog_due = now + self.watchdog_timeout / 2
        self._fed = fed

    def progressing(self, view: ServiceView, now: float) -> bool:
        """Training progresses, or the supervisor is acting on a deadline of its own."""
        if view.state != "running" or view.quiet_since is None or self.watchdog_timeout is None:
            return True
        return now - view.quiet_since < self.watchdog_timeout

    def _tick_extend(self, view: ServiceView, now: float) -> None:
        saving = view.state == "stopping" and view.stop_reason is not None and not view.hang
        if not saving:
            self._extend_due = self._progress_mark = self._last_progress = None
            return
        if self._extend_due is not None and now < self._extend_due:
            return
        self._extend_due = now + EXTEND_EVERY
        mark = (tmp_bytes(view.root), view.last_checkpoint and view.last_checkpoint.get("name"), view.quiet_since)
        if self._progress_mark is not None and mark != self._progress_mark:
            self._last_progress = now
        self._progress_mark = mark
        if self._last_progress is not None and now - self._last_progress < STALL_SECONDS:
            usec = int((self._last_progress + STALL_SECONDS - now) * 1e6) + int(EXTEND_EVERY * 1e6)
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={usec}")


def status_text(view: ServiceView, now: float, wall: float) -> str:
    """One line for ``systemctl status``: what the run does, its step, its last checkpoint, restarts."""
    if view.state == "running":
        head = "training" if view.step is not None else "running, waiting for the first step"
    elif view.state == "stopping" and view.hang:
        head = "restarting a hung trainer (no heartbeat)"
    elif view.state == "stopping":
        left = f", {max(0.0, view.stop_deadline - now):.0f} s of grace left" if view.stop_deadline else ""
        head = f"stopping ({view.stop_reason}): writing the emergency checkpoint{left}"
    elif view.state == "killing":
        head = "killing the trainer (its grace ran out)"
    elif view.state == "backoff":
        wait = f" in {max(0.0, view.backoff_until - now):.0f} s" if view.backoff_until is not None else ""
        head = f"restarting{wait} (restart #{view.restarts})"
    elif view.exit_code is not None:
        head = f"exited with {view.exit_code}" + (f": {view.exit_text}" if view.exit_text else "")
    else:
        head = view.state
    parts = [head, "no step yet" if view.step is None else f"step {view.step}"]
    ck = view.last_checkpoint
    if ck:
        age = f", {age_text(wall - ck['time'])} ago" if isinstance(ck.get("time"), (int, float)) else ""
        parts.append(f"last checkpoint step {ck.get('step')} ({ck.get('kind')}{age})")
    else:
        parts.append("no checkpoint yet")
    parts.append(f"{view.restarts} restart" + ("" if view.restarts == 1 else "s"))
    return "; ".join(parts)


def age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def tmp_bytes(root: str) -> int:
    """Bytes written so far into checkpoints being written (``.tmp-*`` directories) under ``root``."""
    total = 0
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(TMP_PREFIX)]
    except OSError:
        return 0
    for entry in entries:
        try:
            with os.scandir(entry.path) as files:
                total += sum(f.stat(follow_symlinks=False).st_size for f in files)
        except OSError:
            continue  # committed or removed meanwhile
    return total
