"""The child's life as the loop carries it out: spawn it with its environment, forward its stderr (keeping
a tail), signal it, kill what is left of it, ask a hung run for its stacks and read them.

The decisions (when to spawn, signal, kill, dump stacks) are the core's (core.py); process.py holds the
system calls. Everything here runs on the loop's thread.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import store
from . import actions as act
from .control import Peer
from .ledger import fmt, stack_path
from .policy import ExitStatus
from .process import Child, Processes, oom_kill_count, process_state, system_oom_kill_count
from .reserve import SpareFd

STDERR_TAIL = 20  # lines of the child's stderr kept to show when the run gives up


@dataclass
class LifeIO:
    """The current child process and what the loop holds for it."""

    child: Child
    oom_before: int
    system_oom_before: int
    stderr_fd: int | None = None
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    stderr_partial: bytes = b""
    stacks_due: float | None = None  # hang: when to read the stack dumps we asked for
    hung: tuple[Peer, ...] = ()  # the silent trainers of a hang
    dumped: tuple[Peer, ...] = ()  # every trainer of a hang: their stacks are read


class ChildRunner:
    def __init__(self, sel: selectors.BaseSelector, spare: SpareFd, record: Callable[..., None]) -> None:
        self.procs = Processes()
        self.life: LifeIO | None = None
        self.socket_dir = ""  # where trainers' stack dumps must be (ledger.stack_path)
        self._sel = sel
        self._spare = spare  # released around the kills, so EMFILE cannot stop them (reserve.py)
        self._record = record  # Supervisor._event: log, journal and count one event

    def spawn(self, argv: list[str], env: dict[str, str], now: float, fds: tuple[tuple[int, int], ...] = ()) -> int:
        """Start the child (inheriting ``fds``: process.Processes.spawn); its pid. Raises OSError when it cannot
        start."""
        oom_before, system_oom_before = oom_kill_count(), system_oom_kill_count()
        child = self.procs.spawn(argv, env, now, fds)
        life = self.life = LifeIO(child, oom_before, system_oom_before, stderr_fd=child.stderr)
        if child.stderr is not None:
            self._sel.register(child.stderr, selectors.EVENT_READ, lambda mask: self.stderr(life))
        return child.pid

    def signal(self, signum: int) -> None:
        if self.life is not None:
            self.procs.signal_main(self.life.child, signum)

    def kill(self, why: str) -> None:
        """SIGKILL the child's group (the grace ran out); the stacks asked for are read first."""
        life = self.life
        if life is None:
            return
        if life.stacks_due is not None:
            self.collect_stacks(life)
        with self._spare.released():
            killed = self.procs.kill_all(life.child)
        self._record("warning", "kill", f"{why}: SIGKILL to the process group of pid {life.child.pid}",
                     pid=life.child.pid, killed=killed)

    def kill_all(self) -> None:
        """An exception escaped the loop: leave nothing running."""
        if self.life is not None:
            with self._spare.released():
                self.procs.kill_all(self.life.child)

    def stderr(self, life: LifeIO, final: bool = False) -> None:
        """Pass the child's stderr through to ours, keeping its last lines for a give-up message.

        ``final``: the child is gone and its leftovers killed; read what is there and close the pipe.
        """
        fd = life.stderr_fd
        if fd is None:
            return
        while True:
            try:
                data: bytes | None = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if not data:
                break
            try:
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()
            except (OSError, ValueError, AttributeError):
                pass  # our stderr is gone; the tail is still kept
            *lines, partial = (life.stderr_partial + data).split(b"\n")
            life.stderr_tail.extend(line[-1000:] for line in lines)
            life.stderr_partial = partial[-1000:]
        if data == b"" or final:  # EOF: every writer is gone
            if life.stderr_partial:
                life.stderr_tail.append(life.stderr_partial)
                life.stderr_partial = b""
            self._sel.unregister(fd)
            os.close(fd)
            life.stderr_fd = None

    def ask_stacks(self, action: act.DumpStacks) -> None:
        """A hang: signal the trainers for their stack dumps; :meth:`collect_stacks` reads them at ``due``."""
        life = self.life
        if life is None:
            return
        life.hung, life.dumped = action.hung, action.dumped
        asked = [p for p in action.asked if p.stack_signal and self.procs.signal_pid(p.pid or 0, p.stack_signal)]
        life.stacks_due = action.due if asked else None

    def collect_stacks(self, life: LifeIO) -> None:
        """Read the stack dumps of a hang into the log and the journal."""
        life.stacks_due = None
        for peer in life.dumped or life.hung:
            path = stack_path(peer, self.socket_dir)
            text = ""
            if path:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        text = f.read(256 << 10).decode("utf-8", "replace").strip()
                except OSError:
                    pass
                with contextlib.suppress(OSError):
                    store.unlink_at(path, check=store.private_dir)
            if not text:
                state = process_state(peer.pid or 0)
                text = ("no stack dump: the process is stopped (SIGSTOP or a debugger)" if state in ("T", "t") else
                        "no stack dump: the process did not run its handler (stuck in the kernel, state "
                        f"{state or 'gone'})" if peer.stack_signal else
                        "no stack dump: the trainer did not arm one")
            silent = peer in life.hung
            self._record("warning", "hang_stacks", f"stacks of {'hung' if silent else 'waiting'} pid {peer.pid} "
                         f"(rank {fmt(peer.rank)}{'' if silent else ', not silent'}):", lines=text.splitlines(),
                         pid=peer.pid, rank=peer.rank, silent=silent, stacks=text)

    def peer_closed(self, peer: Peer) -> None:
        """A trainer disconnected: its stack file goes, unless a hang's dump is still to be read from it."""
        path = stack_path(peer, self.socket_dir)
        if path and not (self.life and peer in self.life.dumped):
            with contextlib.suppress(OSError):
                store.unlink_at(path, check=store.private_dir)

    def stacks_due(self) -> float | None:
        return self.life.stacks_due if self.life is not None else None

    def is_current(self, status: ExitStatus) -> LifeIO | None:
        life = self.life
        return life if life is not None and status.pid == life.child.pid else None

    def bury(self, life: LifeIO, guarded: Callable[..., Any], rescan: Callable[[], Any]) -> int:
        """The child's main process exited: ``rescan`` the directory, read the stacks still due, kill its
        leftovers, stop watching it; how many leftovers were killed. Every step is guarded (``guarded(where,
        fn, *args)``) and what needs descriptors runs with the spare one free: out of descriptors (EMFILE) or
        memory, the exit is still judged and the run goes on or ends; it never stays half-handled."""
        with self._spare.released():
            guarded("rescan", rescan)
            if life.stacks_due is not None:
                guarded("stacks", self.collect_stacks, life)
            self.life = None
            leftovers = guarded("leftover kill", self.procs.kill_all, life.child) or 0
        self.procs.forget(life.child)
        guarded("child stderr", self.stderr, life, True)
        return leftovers

    def exit_event(self, life: LifeIO, status: ExitStatus, leftovers: int) -> act.ChildExited:
        return act.ChildExited(status, oom_kills=oom_kill_count() - life.oom_before,
                               system_oom_kills=system_oom_kill_count() - life.system_oom_before,
                               leftovers=leftovers, stderr_tail=tuple(life.stderr_tail))
