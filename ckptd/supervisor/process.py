"""The only module that spawns, signals and reaps processes.

Hygiene, and why each piece is there:

- The child starts in its own session (so its own process group): terminal Ctrl-C reaches only the
  supervisor, and the whole run can be killed as one group.
- The supervisor is a child subreaper: orphaned descendants (DataLoader workers of a dead trainer)
  are re-parented to it, reaped by :meth:`Processes.reap`, and killed when the run's child ends.
- Only what the supervisor started is signalled or waited for. Children it already had when it started are
  not part of the run: ``cmd > >(tee log)`` in bash forks ``tee`` and then execs ``ckptd run`` in the same
  process, so ``tee`` is the supervisor's child. Such a child is never killed and never reaped (its pid,
  unreaped, can then never name another process); an orphan in the supervisor's own session, or in the
  session of such a child, is reaped but never killed: the trainer's descendants are never in either.
- The child gets ``PR_SET_PDEATHSIG(SIGKILL)`` from a tiny exec wrapper (no ``preexec_fn``: the
  supervisor has threads), so a SIGKILLed supervisor takes the trainer's main process with it.
- PDEATHSIG covers the direct child only. A guard process (its own session, holding the read end of a
  pipe only the supervisor can write) sees EOF when the supervisor dies and SIGKILLs every process of
  the child's session. Only a descendant that calls setsid() itself escapes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .policy import ExitStatus

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# argv: -c PARENT_PID CMD [ARGS...]. Runs with -I -S: starts in ~10 ms and imports nothing of ours.
_EXEC_WRAPPER = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(137)  # the supervisor died before PDEATHSIG was armed
for s in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)  # Python ignores these; an exec'd program must not inherit that
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("ckptd: cannot start %r: %s\n" % (sys.argv[2], e.strerror))
    sys.stderr.flush()
    os._exit(127)
"""

# Reads session ids ("+SID", "-SID") from fd 3; "q" = clean exit; EOF = supervisor died: kill them.
_GUARD = r"""
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
sids, buf = set(), b""
while True:
    try:
        data = os.read(3, 4096)
    except InterruptedError:
        continue
    if not data:
        break
    *lines, buf = (buf + data).split(b"\n")
    for line in lines:
        if line == b"q":
            os._exit(0)
        if line[:1] == b"+":
            sids.add(int(line[1:]))
        elif line[:1] == b"-":
            sids.discard(int(line[1:]))

def members():
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2:].split()[3]) in sids:
                yield int(name)

for _ in range(5):
    found = False
    for sid in sids:
        try:
            os.killpg(sid, signal.SIGKILL)
        except OSError:
            pass
    for pid in members():
        try:
            os.kill(pid, signal.SIGKILL)
            found = True
        except OSError:
            pass
    if not found:
        break
"""


@dataclass(frozen=True)
class Child:
    pid: int  # the trainer's main process; also its process group and session id
    started: float  # monotonic
    stderr: int | None = None  # read end of the child's stderr pipe (the loop forwards and keeps a tail)


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _stat_fields(pid: str) -> list[bytes] | None:
    """state, ppid, pgrp, session, ... of /proc/PID/stat (None when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def _processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, stat fields) of every process that is there while /proc is read; none when /proc cannot be
    listed (out of descriptors, EMFILE): callers are on the child-exit path and must never raise there."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if name.isdigit():
            fields = _stat_fields(name)
            if fields is not None:
                yield int(name), fields


class Processes:
    """Spawns the child, signals it, kills what is left of it, and reaps every descendant."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._guard_pid: int | None = None
        self._guard_w: int | None = None
        self._foreign: frozenset[int] = frozenset()  # children we had before setup(): not part of the run
        self._not_ours: frozenset[int] = frozenset()  # our own session and theirs: no trainer process is there

    def setup(self) -> None:
        """Note the children we already have (not ours), become a subreaper, start the guard. Call once,
        from the main thread, before :meth:`spawn`."""
        foreign = {pid: fields for pid, fields in _processes() if int(fields[1]) == self.pid}
        self._foreign = frozenset(foreign)
        self._not_ours = frozenset({os.getsid(0), *(int(f[3]) for f in foreign.values())})
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        r, w = os.pipe()
        try:
            self._guard_pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", "-c", _GUARD], dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_DUP2, r, 3)], setsid=True, setsigmask=(),
            )
        finally:
            os.close(r)
        self._guard_w = w

    def spawn(self, argv: list[str], env: dict[str, str], now: float,
              fds: tuple[tuple[int, int], ...] = ()) -> Child:
        """Start ``argv`` in a new session with PDEATHSIG armed. Raises OSError when it cannot start.

        ``fds``: (descriptor here, number in the child) pairs the child inherits (dup2 clears close-on-exec
        there only): the memory tier's region.

        The child's stderr is a pipe (``Child.stderr``, non-blocking) so the supervisor can show its last
        lines when it gives up; stdout is inherited. Must run on the main thread: PDEATHSIG fires when
        the *thread* that forked exits.
        """
        wrapper = [sys.executable, "-I", "-S", "-c", _EXEC_WRAPPER, str(self.pid), *argv]
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(sys.executable, wrapper, env, setsid=True, setsigmask=(),
                                 setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, w, 2),
                                               *((os.POSIX_SPAWN_DUP2, fd, to) for fd, to in fds)])
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self._tell_guard(f"+{pid}")
        return Child(pid=pid, started=now, stderr=r)

    def signal_pid(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to one process of the run (a trainer rank that announced itself)."""
        try:
            os.kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def signal_main(self, child: Child, sig: int) -> bool:
        """Send ``sig`` to the trainer's main process only (never its workers)."""
        try:
            os.kill(child.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill_all(self, child: Child) -> int:
        """SIGKILL the child's group, its session, and orphans of the run re-parented to us.

        Returns how many live processes were signalled (0 when the main process was the whole run).
        """
        targets = [pid for pid, fields in _processes()
                   if pid not in (self.pid, self._guard_pid) and fields[0] != b"Z"
                   and (int(fields[3]) == child.pid or (int(fields[1]) == self.pid and self._ours(pid, fields)))]
        try:
            os.killpg(child.pid, signal.SIGKILL)  # also what forked since the scan
        except (ProcessLookupError, PermissionError):
            pass
        killed = 0
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        return killed

    def _ours(self, pid: int, fields: list[bytes]) -> bool:
        """A child of ours that we started or that the run left behind (an orphan re-parented to us)."""
        return pid not in self._foreign and pid != self._guard_pid and int(fields[3]) not in self._not_ours

    def forget(self, child: Child) -> None:
        """The child's session is gone; the guard need not watch it any more."""
        self._tell_guard(f"-{child.pid}")

    def reap(self) -> list[ExitStatus]:
        """Collect every exited descendant, never a child we had before :meth:`setup` (never blocks)."""
        out = []
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            if info.si_pid in self._foreign:
                # waitid(P_ALL) shows this one again and again: collect the others by pid
                out += self._reap_each(pid for pid, f in _processes()
                                       if f[0] == b"Z" and int(f[1]) == self.pid and pid not in self._foreign)
                break
            got = self._reap_each([info.si_pid])
            if not got:
                break  # collected elsewhere meanwhile; never spin on it
            out += got
        return out

    def _reap_each(self, pids: Iterable[int]) -> list[ExitStatus]:
        out = []
        for pid in pids:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == 0:
                continue
            if got == self._guard_pid:
                self._guard_pid = None
            out.append(ExitStatus.from_wait(got, status))
        return out

    def shutdown(self) -> None:
        """Let the guard exit cleanly and reap it."""
        self._tell_guard("q")
        if self._guard_w is not None:
            os.close(self._guard_w)
            self._guard_w = None
        if self._guard_pid is not None:
            try:
                os.waitpid(self._guard_pid, 0)
            except ChildProcessError:
                pass
            self._guard_pid = None

    def _tell_guard(self, line: str) -> None:
        if self._guard_w is not None:
            try:
                os.write(self._guard_w, line.encode() + b"\n")
            except OSError:
                pass  # guard gone: PDEATHSIG still covers the main process


def system_oom_kill_count() -> int:
    """OOM kills on the whole machine since boot (/proc/vmstat oom_kill); 0 if unknown."""
    try:
        with open("/proc/vmstat") as f:
            for row in f:
                if row.startswith("oom_kill "):
                    return int(row.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, D, T stopped, Z, ...), None when gone."""
    fields = _stat_fields(str(pid))
    return fields[0].decode() if fields else None


def oom_kill_count() -> int:
    """OOM kills counted by our memory cgroup (v2 memory.events or v1 memory.oom_control); 0 if unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates.append(f"/sys/fs/cgroup{path}/memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
    for name in candidates:
        try:
            with open(name) as f:
                for row in f:
                    key, _, value = row.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def run_command(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run a short command to its end (``scontrol requeue``); returns (exit code or None, its output).

    Called from the loop's thread, which is also the only one that reaps: the command's exit cannot be
    collected by :meth:`Processes.reap` before ``subprocess`` waits for it.
    """
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, f"{argv[0]} not found on PATH"
    except subprocess.TimeoutExpired:
        return None, f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as exc:
        return None, f"cannot run {argv[0]}: {exc.strerror or exc}"
    return done.returncode, (done.stdout + done.stderr).strip()[-2000:]
