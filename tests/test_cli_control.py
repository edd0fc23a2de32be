"""`ckptd save|stop|status` talk to a running supervisor through its control socket."""

from __future__ import annotations

import json
import os
import signal
import socket

from ckptd import exitcodes
from fixtures.sup_helpers import FAST, PLAIN, TRAINER, Run, ckptd, wait_for


def connected(root, n=1):
    r = ckptd("status", "--dir", root, "--json")
    return r.returncode == 0 and len(json.loads(r.stdout).get("trainers") or []) == n


def test_save_wait_commits_a_manual_checkpoint_and_stop_wait_stops_with_an_emergency_one(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, TRAINER, "--steps", "100000"])
    wait_for(lambda: connected(root), 20, "the trainer to connect")
    saved = ckptd("save", "--wait", "--dir", root)
    assert saved.returncode == 0, saved.stderr
    assert "checkpoint committed" in saved.stdout and "manual" in saved.stdout
    manual = run.events("checkpoint")[-1]
    assert manual["kind"] == "manual" and os.path.isdir(manual["path"])
    # the trainer was told somebody waits, so a Checkpointer writes it at full speed (no pacing)
    wait_for(lambda: "waited=True" in run.stdout(), 10, "the trainer to print the save request")
    status = ckptd("status", "--dir", root)
    assert "state:      running" in status.stdout and manual["name"] in status.stdout
    stopped = ckptd("stop", "--wait", "--dir", root)
    assert stopped.returncode == 0, stopped.stderr
    assert "exit code 85" in stopped.stdout
    assert run.wait(10) == exitcodes.PREEMPTED
    assert run.events("checkpoint")[-1]["kind"] == "emergency"
    offline = ckptd("status", "--dir", root, "--json")
    data = json.loads(offline.stdout)
    assert data["state"] == "not running" and data["last_state"] == "exited" and data["exit_code"] == 85
    assert data["last_checkpoint"]["kind"] == "emergency"


def test_save_without_a_connected_trainer_is_refused_with_a_reason(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [PLAIN])
    run.wait_event("spawn")
    r = ckptd("save", "--dir", root)
    assert r.returncode == exitcodes.FAILURE and "no trainer is connected" in r.stderr
    run.signal(signal.SIGTERM)
    run.wait(10)


def test_commands_without_a_running_supervisor_exit_not_running(tmp_path):
    root = str(tmp_path / "ck")
    os.makedirs(root)
    for cmd in ("save", "stop"):
        r = ckptd(cmd, "--dir", root)
        assert r.returncode == exitcodes.NOT_RUNNING and "no `ckptd run`" in r.stderr
    r = ckptd("status", "--dir", root)
    assert r.returncode == exitcodes.NOT_FOUND


def test_control_socket_is_owner_only(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [PLAIN])
    run.wait_event("spawn")
    sock_path = os.path.join(root, ".ckptd", "control.sock")
    wait_for(lambda: os.path.exists(sock_path), 10, "the socket")
    assert os.stat(sock_path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(sock_path)).st_mode & 0o777 == 0o700
    # SO_PEERCRED is what the server checks; a same-uid peer is accepted and answered
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(b'{"type":"status"}\n')
    s.settimeout(5)
    assert b'"type":"status"' in s.recv(65536)
    s.close()
    run.signal(signal.SIGTERM)
    run.wait(10)


def _connect_as_nobody(sock_path: str) -> str:
    """Fork, drop to uid 65534, try the control socket; returns what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        outcome = "answered"
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(sock_path)
            s.sendall(b'{"type":"hello","role":"client"}\n{"type":"status"}\n')
            if not s.recv(65536):
                outcome = "closed"
        except PermissionError:
            outcome = "denied"
        except (BrokenPipeError, ConnectionResetError):
            outcome = "closed"
        except OSError as exc:
            outcome = f"oserror {exc}"
        os.write(w, outcome.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 200).decode()
    os.close(r)
    return out


import pytest  # noqa: E402


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_control_the_run(tmp_path):
    import tempfile

    base = tempfile.mkdtemp(prefix="ckptd-perm-", dir="/tmp")
    os.chmod(base, 0o755)  # traversable by anyone: only ckptd's own permissions protect the socket
    run = None
    try:
        root = os.path.join(base, "ck")
        run = Run(tmp_path, root, [PLAIN])
        run.wait_event("spawn")
        sock_path = os.path.join(root, ".ckptd", "control.sock")
        wait_for(lambda: os.path.exists(sock_path), 10, "the socket")
        assert _connect_as_nobody(sock_path) == "denied"
        # even with the permissions loosened by hand, SO_PEERCRED refuses the stranger
        os.chmod(os.path.dirname(sock_path), 0o777)
        os.chmod(sock_path, 0o777)
        assert _connect_as_nobody(sock_path) == "closed"
        wait_for(lambda: "refused a control connection from uid 65534" in run.stderr(), 10, "the refusal log")
        run.signal(signal.SIGTERM)
        assert run.wait(10) == exitcodes.STOPPED_NO_CHECKPOINT
    finally:
        import shutil

        if run is not None:
            run.kill()
        shutil.rmtree(base, ignore_errors=True)
