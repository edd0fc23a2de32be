"""sd_notify as systemd would read it: READY, STATUS, WATCHDOG following progress, EXTEND_TIMEOUT_USEC, STOPPING.

The first tests drive :class:`ckptd.supervisor.service.Service` with a recording notifier and made-up times;
the last runs `ckptd run` with a test-owned NOTIFY_SOCKET (SO_PASSCRED names the sender) and the fixture trainer.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from ckptd import exitcodes
from ckptd.supervisor.notify import Notifier
from ckptd.supervisor.service import STALL_SECONDS, Service, ServiceView, age_text, status_text
from fixtures.sup_helpers import FAST, TRAINER, Run, ckptd, freeze, hold, wait_for


class Recorder(Notifier):
    def __init__(self, watchdog_usec: int | None = 2_000_000) -> None:
        super().__init__("@test", watchdog_usec)
        self.sent: list[str] = []

    def send(self, *fields: str) -> None:
        self.sent.extend(fields)

    def take(self) -> list[str]:
        out, self.sent = self.sent, []
        return out


CK = {"name": "step-000000000120", "step": 120, "kind": "periodic", "time": 1000.0}


def test_status_line_names_state_step_checkpoint_age_and_restarts():
    view = ServiceView(state="running", step=123, last_checkpoint=CK, restarts=1)
    assert status_text(view, now=0.0, wall=1042.0) == \
        "training; step 123; last checkpoint step 120 (periodic, 42 s ago); 1 restart"
    stopping = ServiceView(state="stopping", step=130, stop_reason="SIGTERM", stop_deadline=20.0, restarts=2)
    assert status_text(stopping, now=5.0, wall=0.0).startswith(
        "stopping (SIGTERM): writing the emergency checkpoint, 15 s of grace left; step 130; no checkpoint yet")
    assert status_text(ServiceView(state="backoff", backoff_until=3.0, restarts=2), 1.0, 0.0).startswith(
        "restarting in 2 s (restart #2)")
    assert status_text(ServiceView(state="stopping", hang=True), 0.0, 0.0).startswith("restarting a hung trainer")
    done = ServiceView(state="exited", exit_code=85, exit_text="stopped", last_checkpoint={**CK, "kind": "emergency"})
    assert status_text(done, 0.0, 1000.0 + 7200).startswith("exited with 85: stopped; no step yet; "
                                                             "last checkpoint step 120 (emergency, 2 h ago)")
    assert [age_text(s) for s in (0, 119, 120, 7199, 7200)] == ["0 s", "119 s", "2 min", "120 min", "2 h"]


def test_ready_carries_a_status_and_the_status_is_refreshed_only_when_it_changes():
    rec = Recorder(None)
    svc = Service(rec)
    svc.ready(ServiceView(state="running"), 0.0, 0.0)
    assert rec.take() == ["READY=1", "STATUS=running, waiting for the first step; no step yet; no checkpoint yet; "
                          "0 restarts"]
    svc.tick(ServiceView(state="running"), 1.0, 0.0)
    assert rec.take() == []  # nothing changed
    svc.tick(ServiceView(state="running", step=5), 2.0, 0.0)
    assert rec.take() == []  # the step alone waits for the next refresh (5 s)
    svc.tick(ServiceView(state="running", step=7), 6.0, 0.0)
    assert rec.take() == ["STATUS=training; step 7; no checkpoint yet; 0 restarts"]
    svc.tick(ServiceView(state="backoff", step=7, restarts=1), 6.5, 0.0)  # a state change is told at once
    assert rec.take()[0].startswith("STATUS=restarting")


def test_watchdog_follows_trainer_progress_not_supervisor_liveness():
    rec = Recorder(2_000_000)  # WatchdogSec=2: a ping is due every second
    svc = Service(rec)
    svc.ready(ServiceView(state="running"), 0.0, 0.0)
    rec.take()
    pings = []
    for i in range(1, 81):  # 8 s in steps of 0.1 s; the trainer speaks until t=3, is silent until t=6
        now = i / 10
        quiet = min(now, 3.0) if now < 6 else now
        svc.tick(ServiceView(state="running", step=1, quiet_since=quiet), now, 0.0)
        pings += [now for m in rec.take() if m == "WATCHDOG=1"]
    # Fed each second while it trains, never once it has been silent for WatchdogSec, at once when it speaks again.
    assert [p for p in pings if p < 6] == [0.1, 1.1, 2.1, 3.1, 4.1]  # the last one 1.1 s into the silence
    assert pings[5:7] == [6.0, 7.0]


@pytest.mark.parametrize("state", ["stopping", "killing", "backoff", "idle"])
def test_watchdog_is_fed_while_the_supervisor_acts_on_deadlines_of_its_own(state):
    svc = Service(Recorder(2_000_000))
    # A hung trainer (silent for an hour) that ckptd is killing, or a restart pending: ckptd's own timers bound it.
    assert svc.progressing(ServiceView(state=state, quiet_since=-3600.0, hang=True), 0.0)
    assert not svc.progressing(ServiceView(state="running", quiet_since=-3600.0), 0.0)
    assert svc.progressing(ServiceView(state="running", quiet_since=None), 0.0)  # no trainer connected: liveness


def test_stop_timeout_is_extended_only_while_the_emergency_checkpoint_grows(tmp_path):
    rec = Recorder(None)
    svc = Service(rec)
    tmp = tmp_path / ".tmp-step-000000000007-host-1-abcdef12"
    tmp.mkdir()
    view = ServiceView(state="stopping", stop_reason="SIGTERM", root=str(tmp_path))
    extends = []
    for i in range(30):  # the save writes for 5 s, then stalls
        if i < 5:
            with open(tmp / "tensors.safetensors", "ab") as f:
                f.write(b"x" * 100)
        svc.tick(view, float(i), 0.0)
        extends += [(i, int(m.split("=")[1])) for m in rec.take() if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert [t for t, _ in extends] == list(range(1, 4 + int(STALL_SECONDS)))  # last growth at t=4
    for t, usec in extends:  # each reaches STALL_SECONDS past the last growth seen, plus one look
        assert usec == pytest.approx((min(t, 4) + STALL_SECONDS - t + 1) * 1e6, abs=1)
    hung = ServiceView(state="stopping", hang=True, root=str(tmp_path))
    svc.tick(hung, 100.0, 0.0)
    assert not [m for m in rec.take() if m.startswith("EXTEND")]  # a hung trainer writes nothing worth waiting for


# --- the real supervisor and a test-owned NOTIFY_SOCKET -------------------------------------------------------


class NotifySocket:
    """A datagram socket like systemd's: records (monotonic time, sender pid, field) in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, int, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((struct.unpack("3i", d)[0] for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            now = time.monotonic()
            self.got.extend((now, pid, f) for f in data.decode().split("\n") if f)

    def fields(self, prefix: str, since: float = 0.0) -> list[tuple[float, int, str]]:
        return [g for g in list(self.got) if g[2].startswith(prefix) and g[0] >= since]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    yield ns
    ns.close()


def _status(root):
    import json

    r = ckptd("status", "--dir", root, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_supervisor_tells_ready_status_watchdog_by_progress_extend_and_stopping(tmp_path, notify_socket):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--grace", "20", TRAINER, "--steps", "100000", "--step-time", "0.02",
                               "--emergency-save-time", "3"],
              env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"})
    ready = wait_for(lambda: notify_socket.fields("READY=1"), 20, "READY=1")
    assert ready[0][1] == run.pid  # only the supervisor talks to systemd; the child's NOTIFY_SOCKET is unset
    trainer = wait_for(lambda: (_status(root).get("trainers") or [{}])[0].get("pid"), 20, "the trainer")
    wait_for(lambda: any("; step " in f for _, _, f in notify_socket.fields("STATUS=")), 20, "a STATUS with a step")

    # Training: a ping every WATCHDOG_USEC/2.
    t0 = time.monotonic()
    wait_for(lambda: len(notify_socket.fields("WATCHDOG=1", t0)) >= 3, 30, "three pings")
    # A stopped trainer is no progress: the pings stop once it has been silent for WATCHDOG_USEC. When they
    # stop is not a fixed time after the freeze here: the supervisor may read the trainer's last heartbeat,
    # and this test its last ping, late on a busy machine. So: a silence of 2.5 s (five ping periods) comes,
    # and it lasts while the trainer stays stopped.
    assert freeze(trainer)
    stopped = time.monotonic()

    def silent_since() -> float:
        pings = notify_socket.fields("WATCHDOG=1", stopped)
        return pings[-1][0] if pings else stopped

    try:
        wait_for(lambda: time.monotonic() - silent_since() >= 2.5, 30, "the watchdog pings to stop")
        quiet_from = silent_since()

        def no_ping_once_silent() -> None:  # an absence can only be seen over a window
            quiet = notify_socket.fields("WATCHDOG=1", quiet_from + 0.001)
            assert quiet == [], f"watchdog pings while the trainer was stopped: {quiet}"

        hold(no_ping_once_silent, 2.5)
    finally:
        os.kill(trainer, signal.SIGCONT)
    resumed = time.monotonic()
    # ... and resume as soon as it speaks again.
    wait_for(lambda: notify_socket.fields("WATCHDOG=1", resumed), 30, "a ping after SIGCONT")
    assert run.proc.poll() is None

    # Stop: STOPPING at once, then EXTEND_TIMEOUT_USEC while the slow emergency checkpoint grows.
    stop = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(20) == exitcodes.PREEMPTED, run.stderr()
    stopping = notify_socket.fields("STOPPING=1", stop)
    extends = notify_socket.fields("EXTEND_TIMEOUT_USEC=", stop)
    assert stopping and (not extends or stopping[0][0] <= extends[0][0])  # STOPPING first, then the extensions
    assert len(extends) >= 2, notify_socket.got[-20:]
    assert all(1e6 <= int(f.split("=")[1]) <= (STALL_SECONDS + 1) * 1e6 for _, _, f in extends)
    assert extends[-1][0] > stop + 2.0  # still extending late in the 3 s save
    assert run.events("checkpoint")[-1]["kind"] == "emergency"
    last = notify_socket.fields("STATUS=")[-1][2]
    assert last.startswith("STATUS=exited with 85: stopped on request after an emergency checkpoint"), last
