"""The supervisor survives hostile and broken input and keeps supervising: crafted control traffic, a
flood of idle connections, running out of file descriptors, damaged manifests, a journal on a full disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import time

import psutil
import pytest

from ckptd import exitcodes
from ckptd.supervisor.journal import Journal
from fixtures.slow_clients import Background, Drippers
from fixtures.sup_helpers import FAST, FIXTURES, TRAINER, Run, ckptd, journal, wait_for


def _status(root: str) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _start(tmp_path, **kw) -> tuple[Run, str]:
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--every-steps", "20", TRAINER, "--steps", "10000000", "--step-time", "0.01"],
              **kw)
    run.wait_event("checkpoint", timeout=30)
    return run, root


def _still_supervising(run: Run, root: str) -> None:
    """Alive, answering, and the trainer still trains and checkpoints."""
    assert run.proc.poll() is None, run.stderr()
    n = len(run.events("checkpoint"))
    run.wait_event("checkpoint", count=n + 1, timeout=30)
    st = _status(root)
    assert st["state"] == "running" and st["trainers"], st
    assert "Traceback" not in run.stderr(), run.stderr()


def _socket(root: str) -> str:
    return os.path.join(root, ".ckptd", "control.sock")


def test_a_deeply_nested_json_line_on_the_control_socket_drops_that_peer_only(tmp_path):
    run, root = _start(tmp_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(_socket(root))
    s.sendall(b"[" * 100_000 + b"\n")
    wait_for(lambda: s.recv(1) == b"", 10, "the supervisor to close that connection")
    s.close()
    _still_supervising(run, root)
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED


def test_1100_idle_connections_neither_kill_the_supervisor_nor_lock_out_status(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"needs 1400 file descriptors in the test process (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    run, root = _start(tmp_path)
    socks = []
    try:
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            socks.append(s)
            # a full listen backlog answers EAGAIN: retry until the supervisor has accepted some
            wait_for(lambda s=s: s.connect_ex(_socket(root)) in (0, 106), 20, "a connection")  # 106: EISCONN
        _still_supervising(run, root)  # includes `ckptd status` while all of them are connected
        # the supervisor holds a bounded number of them, not 1100
        held = len([c for c in psutil.Process(run.pid).net_connections(kind="unix")])
        assert held < 400, held
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED


def test_out_of_file_descriptors_the_listener_rests_and_idle_peers_time_out(tmp_path):
    """RLIMIT_NOFILE=64 for the supervisor: accept() fails with EMFILE. It pauses instead of spinning,
    drops the connections that never said hello after 10 s, and answers `ckptd status` again."""
    run, root = _start(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks = []
    for _ in range(120):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(_socket(root))
        except (BlockingIOError, ConnectionRefusedError, OSError):
            s.close()
            continue
        socks.append(s)
    wait_for(lambda: "cannot accept control connections" in run.stderr(), 20, "the EMFILE warning")
    proc = psutil.Process(run.pid)
    t0, cpu0 = time.monotonic(), sum(proc.cpu_times()[:2])
    # idle past the hello timeout (10 s): the silent peers are dropped and status answers again
    wait_for(lambda: time.monotonic() - t0 > 11 and ckptd("status", "--dir", root).returncode == 0, 40,
             "status to answer after the idle peers time out")
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    assert cpu < 0.5 * (time.monotonic() - t0), f"supervisor spun: {cpu:.1f} s CPU"
    for s in socks:
        s.close()
    _still_supervising(run, root)
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED


@pytest.mark.parametrize("manifest", [
    b"[" * 100_000,
    json.dumps({"format": "ckptd/1", "step": 999999, "kind": "manual", "created": "yesterday",
                "metrics": [1, 2], "files": {}}).encode(),
    json.dumps({"format": "ckptd/1", "step": "x", "kind": 5, "created": None, "files": []}).encode(),
], ids=["deep", "bad-types", "bad-step"])
def test_a_damaged_manifest_appearing_during_a_run_is_reported_and_supervision_goes_on(tmp_path, manifest):
    run, root = _start(tmp_path)
    bad = os.path.join(root, "step-000000999999")
    os.makedirs(bad + ".part")
    with open(os.path.join(bad + ".part", "manifest.json"), "wb") as f:
        f.write(manifest)
    os.rename(bad + ".part", bad)
    run.wait_event("checkpoint_invalid", timeout=30, name="step-000000999999")
    _still_supervising(run, root)
    st = _status(root)
    assert st["last_checkpoint"]["name"] != "step-000000999999"
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.PREEMPTED


def test_the_journal_on_a_full_device_drops_and_counts_events_and_never_raises(tmp_path):
    messages = []
    j = Journal("/dev/full", time.time, on_error=lambda *a: messages.append(a))  # every write: ENOSPC
    for i in range(5):
        j.append("checkpoint", step=i)
    j.close()
    assert j.dropped == 5 and j.dropped_total == 5
    assert len(messages) == 1 and "No space left on device" in messages[0][2]


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is needed for fault injection (apt-get install strace)")
def test_the_supervisor_keeps_supervising_when_journal_and_state_writes_fail(tmp_path):
    root = str(tmp_path / "ck")
    os.makedirs(os.path.join(root, ".ckptd"), mode=0o700)
    path = os.path.join(root, ".ckptd", "journal.jsonl")
    open(path, "w").close()
    # state.json cannot be replaced: a directory sits at its name (every write fails, EISDIR)
    os.makedirs(os.path.join(root, ".ckptd", "state.json", "x"))
    # the first two writes (start, spawn) land; every later write to the journal fails with ENOSPC
    strace = ["strace", "-f", "--seccomp-bpf", "-qqq", "-o", "/dev/null", "-P", path, "-e", "trace=write",
              "-e", "inject=write:error=ENOSPC:when=3+"]
    run = Run(tmp_path, root, [*FAST, "--every-steps", "20", TRAINER, "--steps", "10000000", "--step-time", "0.01"],
              prefix=strace)
    wait_for(lambda: os.path.exists(os.path.join(root, "step-000000000060")), 60, "three checkpoints")
    r = ckptd("save", "--wait", "--dir", root, "--timeout", "30")
    assert r.returncode == 0, r.stderr
    pid = _status(root)["supervisor_pid"]
    os.kill(pid, signal.SIGTERM)
    assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()
    err = run.stderr()
    assert err.count("cannot write the journal") == 1, err
    assert "cannot write state.json" in err, err
    assert "Traceback" not in err, err
    assert [e["event"] for e in journal(root)] == ["start", "spawn"]


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    import subprocess

    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces (unshare -m) for a private tmpfs")
def test_on_a_full_disk_the_supervisor_backs_off_gives_up_and_says_why(tmp_path):
    """Checkpoints, journal and state all on one full tmpfs: the trainer's saves fail with ENOSPC and it
    exits; the supervisor (whose own journal writes fail too) restarts it with growing backoff, gives up
    after the same step failed 3 times, and shows the reason - no crash loop, no traceback of its own."""
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f'mount -t tmpfs -o size=8m tmpfs "{mnt}" && exec "{sys.executable}" -m ckptd run --dir "{mnt}/ck" '
              f'--backoff-base 0.2 --backoff-max 2 "{os.path.join(FIXTURES, "full_disk_trainer.py")}"')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=180)
    err = r.stderr
    assert r.returncode == exitcodes.GAVE_UP, err[-3000:]
    assert "crashed 3 times in a row" in err and "No space left on device" in err.split("giving up")[-1], err[-3000:]
    delays = [float(line.split("restarting in ")[1].split(" s")[0]) for line in err.splitlines()
              if "restarting in " in line]
    assert len(delays) == 2 and delays[1] > delays[0] * 0.99, delays  # backed off, not a loop
    assert "cannot write the journal" in err  # it kept supervising with its own writes failing
    assert 'File "' not in "\n".join(line for line in err.splitlines() if "ckptd/supervisor" in line)


def test_slow_metrics_clients_at_a_low_fd_limit_neither_wedge_the_stop_nor_fake_checkpoint_events(tmp_path):
    """RLIMIT_NOFILE=256 for `ckptd run`, 400 slow clients on its metrics port (each sends a byte now and then
    and reconnects when cut off), then SIGTERM: the emergency checkpoint commits and the run ends 85 while
    the flood goes on; the supervisor's threads stay bounded; the journal gains no checkpoint_removed or
    checkpoint_invalid (the supervisor's own lack of descriptors is not the checkpoints' fault)."""
    limit = 256
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "127.0.0.1:0", "--every-steps", "20", TRAINER,
                               "--steps", "10000000", "--step-time", "0.01"],
              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    addr = run.wait_event("start", timeout=30)["metrics"]["addr"]
    run.wait_event("checkpoint", timeout=30)
    proc = psutil.Process(run.pid)
    threads_before = proc.num_threads()
    flood = Background(Drippers(addr, 400))
    try:
        peak = {"threads": 0}

        def flooded():
            peak["threads"] = max(peak["threads"], proc.num_threads() - threads_before)
            return flood.drippers.opened >= 800  # every client connected, and reconnected after a cut

        wait_for(flooded, 120, "400 slow clients to connect twice over")
        n = len(run.events("checkpoint"))
        run.wait_event("checkpoint", count=n + 1, timeout=30)  # training checkpoints on under the flood
        run.signal(signal.SIGTERM)
        assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()[-3000:]
    finally:
        flood.stop()
    events = journal(root)
    assert not [e for e in events if e["event"] in ("checkpoint_removed", "checkpoint_invalid")], events
    assert [e for e in events if e["event"] == "checkpoint"][-1]["kind"] == "emergency"
    assert "unexpected error" not in run.stderr(), run.stderr()[-3000:]
    assert peak["threads"] <= 2 * (limit // 16) + 1, peak  # bounded: max_connections() handlers, twice at most


def test_out_of_descriptors_when_the_trainer_exits_the_stop_still_ends_and_nothing_is_reported_gone(tmp_path):
    """RLIMIT_NOFILE=64 for `ckptd run`, and idle control connections (opened again as fast as they are
    dropped) keep every descriptor taken while SIGTERM stops the run: the child-exit path (directory rescan,
    the leftover kill's /proc scan) runs out of descriptors, yet the run ends 85 and the journal gains no
    checkpoint_removed or checkpoint_invalid."""
    run, root = _start(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks: list[socket.socket] = []

    def exhaust() -> None:
        for s in list(socks):
            try:
                if s.recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                continue
            except OSError:
                pass
            s.close()
            socks.remove(s)
        while len(socks) < 120:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex(_socket(root)) != 0:
                s.close()
                return
            socks.append(s)

    try:
        wait_for(lambda: exhaust() or "cannot accept control connections" in run.stderr(), 30,
                 "the supervisor to run out of descriptors")
        run.signal(signal.SIGTERM)
        wait_for(lambda: exhaust() or run.proc.poll() is not None, 60, "`ckptd run` to end")
        assert run.proc.returncode == exitcodes.PREEMPTED, run.stderr()[-3000:]
    finally:
        for s in socks:
            s.close()
    events = journal(root)
    assert not [e for e in events if e["event"] in ("checkpoint_removed", "checkpoint_invalid")], events
    assert [e for e in events if e["event"] == "checkpoint"][-1]["kind"] == "emergency"


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is needed for fault injection (apt-get install strace)")
def test_emfile_in_the_child_exit_path_neither_wedges_the_stop_nor_reports_a_checkpoint_gone(tmp_path):
    """Every open of /proc (the leftover kill's scan) and of a committed checkpoint's manifest fails with a
    real EMFILE (strace injects it), as it does for a supervisor out of descriptors: the stop still ends 85,
    and that checkpoint is not reported removed or invalid."""
    root = str(tmp_path / "ck")
    manifest = os.path.join(root, "step-000000000020", "manifest.json")
    os.makedirs(os.path.dirname(manifest))  # -P needs the path's directory to exist; the save makes it again
    os.rmdir(os.path.dirname(manifest))
    strace = ["strace", "-f", "--seccomp-bpf", "-qqq", "-o", "/dev/null", "-P", "/proc", "-P", manifest,
              "-e", "trace=openat,open", "-e", "inject=openat,open:error=EMFILE:when=1+"]
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--every-steps", "20", TRAINER, "--steps", "10000000",
                               "--step-time", "0.01"], prefix=strace)
    run.wait_event("checkpoint", timeout=60, name="step-000000000020")
    run.wait_event("checkpoint", timeout=60, name="step-000000000040")
    os.kill(run.events("start")[0]["pid"], signal.SIGTERM)  # the supervisor, not strace
    assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()[-3000:]
    events = journal(root)
    assert not [e for e in events if e["event"] in ("checkpoint_removed", "checkpoint_invalid")], events
    assert [e for e in events if e["event"] == "checkpoint"][-1]["kind"] == "emergency"
    assert [e for e in events if e["event"] == "end"][-1]["exit_code"] == exitcodes.PREEMPTED
