"""Control socket abuse beyond tests/test_supervisor_hostile.py: slow clients, clients
that never read, and another user: the supervisor stays up, training goes on, other clients are served."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from ckptd import exitcodes
from test_supervisor_hostile import _socket, _start, _status, _still_supervising


@pytest.mark.slow
def test_slow_writers_and_clients_that_never_read_do_not_stall_the_supervisor(tmp_path):
    run, root = _start(tmp_path)
    slow = []
    for _ in range(20):  # a status request dribbled one byte at a time, never finished
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(_socket(root))
        slow.append(s)
    deaf = []
    for _ in range(20):  # many requests, replies never read: the supervisor's sends must not block it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(_socket(root))
        s.setblocking(False)
        try:
            for _ in range(2000):
                s.send(b'{"type": "status"}\n')
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed (a client gets one reply, then the connection ends) before all were sent
        deaf.append(s)
    t0 = time.monotonic()
    for i, ch in enumerate(b'{"type": "sta'):
        for s in slow:
            try:
                s.send(bytes([ch]))
            except OSError:
                pass
        if i % 4 == 0:
            assert _status(root)["state"] == "running"
        time.sleep(0.05)
    assert time.monotonic() - t0 < 30
    _still_supervising(run, root)
    for s in slow + deaf:
        s.close()
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED


def _other_user() -> list[str] | None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(_other_user() is None, reason="needs root and setpriv to act as another user (nobody)")
def test_another_user_can_neither_connect_nor_stop_the_run(tmp_path):
    os.chmod(tmp_path, 0o755)
    run, root = _start(tmp_path)
    os.chmod(root, 0o755)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); "
             "s.sendall(b'{\"type\":\"stop\"}\\n'); print('connected')\nexcept OSError as e: print('refused', e.errno)")
    r = subprocess.run([*_other_user(), sys.executable, "-c", probe, _socket(root)], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.startswith("refused"), (r.stdout, r.stderr)
    r = subprocess.run([*_other_user(), sys.executable, "-m", "ckptd", "stop", "--dir", root], capture_output=True,
                       text=True, timeout=30, cwd="/")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    _still_supervising(run, root)
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED
