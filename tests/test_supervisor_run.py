"""Integration tests of `ckptd run` with real processes and the fixture trainers (no torch)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from ckptd import exitcodes
from fixtures.sup_helpers import FAST, LAUNCHER, PLAIN, TRAINER, Run, ckptd, freeze, journal, running, wait_for


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "ck")


def test_training_that_finishes_exits_0_and_journals_start_spawn_exit_end(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--every-steps", "10", TRAINER, "--steps", "30"])
    assert run.wait() == 0, run.stderr()
    names = [e["event"] for e in run.events()]
    assert names[:2] == ["start", "spawn"] and names[-2:] == ["exit", "end"]
    assert [e["step"] for e in run.events("checkpoint")] == [10, 20, 30]
    assert "final_step=30" in run.stdout()


def test_sigterm_mid_run_commits_emergency_checkpoint_exits_85_and_resumes_at_that_step(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--every-steps", "1000", TRAINER, "--steps", "100000"])
    run.wait_event("spawn")
    wait_for(lambda: "start_step=0" in run.stdout(), 20, "the trainer to start")
    # let it train a little, then preempt
    wait_for(lambda: _live_step(root) and _live_step(root) > 5, 20, "a few steps")
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED, run.stderr()
    ck = run.events("checkpoint")[-1]
    assert ck["kind"] == "emergency"
    assert f"stopped at step {ck['step']}" in run.stdout()
    again = Run(tmp_path, root, [*FAST, TRAINER, "--steps", str(ck["step"] + 20)], name="again")
    assert again.wait() == 0, again.stderr()
    assert f"start_step={ck['step']}" in again.stdout()  # zero lost steps
    assert journal(root, "resumed")[-1]["step"] == ck["step"]


def _live_step(root):
    r = ckptd("status", "--dir", root, "--json")
    if r.returncode != 0:
        return None
    import json

    return json.loads(r.stdout).get("step")


def test_sigkill_of_the_child_restarts_from_latest_checkpoint_with_bounded_loss(tmp_path, root):
    every = 10
    run = Run(tmp_path, root,
              [*FAST, "--every-steps", str(every), TRAINER, "--steps", "100000", "--step-time", "0.005"])
    first = run.wait_event("spawn")
    run.wait_event("checkpoint", count=2)
    os.kill(first["pid"], signal.SIGKILL)
    exit_ = run.wait_event("exit", signal=signal.SIGKILL)
    # A SIGKILL from a user is not an OOM: only a kernel-counted OOM kill earns that label.
    assert exit_["reason"] == "signal" and "not by ckptd, and no OOM kill was counted" in exit_["detail"], exit_
    restart = run.wait_event("restart")
    resumed = run.wait_event("resumed")
    assert resumed["step"] == restart["resume_step"]
    assert 0 <= restart["lost_steps"] <= every + 5  # heartbeats lag the step a little
    status = ckptd("status", "--dir", root)
    assert status.returncode == 0 and "restarts:   1 in this run" in status.stdout, status.stdout
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED


def test_a_restart_that_resumes_before_the_newest_checkpoint_journals_the_steps_it_lost(tmp_path, root):
    # The restart expects the newest checkpoint; the library resumes from an older one when the newest does
    # not verify (the fixture trainer acts that out): the difference is lost too, and said so.
    every = 10
    run = Run(tmp_path, root, [*FAST, "--every-steps", str(every), TRAINER, "--steps", "100000", "--step-time",
                               "0.005", "--older-on-restart"])
    first = run.wait_event("spawn")
    run.wait_event("checkpoint", count=3)
    os.kill(first["pid"], signal.SIGKILL)
    restart = run.wait_event("restart")
    resumed = run.wait_event("resumed")
    assert resumed["expected_step"] == restart["resume_step"]
    assert resumed["step"] == restart["resume_step"] - every
    assert resumed["more_lost_steps"] == every
    said = f"not step {restart['resume_step']}: the newer checkpoint did not verify ({every} more steps lost)"
    wait_for(lambda: said in run.stderr(), 10, "the supervisor to say so")
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED


def test_crash_loop_backs_off_growing_then_gives_up_with_low_cpu(tmp_path, root):
    run = Run(tmp_path, root, ["--max-restarts", "4", "--backoff-base", "0.1", "--backoff-max", "10",
                               "--restart-window", "600", "--start-failures", "100", PLAIN, "--crash"])
    proc = psutil.Process(run.pid)
    cpu = 0.0
    start = time.monotonic()
    while run.proc.poll() is None and time.monotonic() - start < 30:
        try:
            t = proc.cpu_times()
            cpu = t.user + t.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    wall = time.monotonic() - start
    assert run.wait() == exitcodes.GAVE_UP, run.stderr()
    delays = [e["delay"] for e in run.events("backoff")]
    assert len(delays) == 4 and len(run.events("give_up")) == 1
    # equal jitter: delay n lies in [d/2, d] with d = 0.1 * 2**(n-1); the ranges do not overlap after doubling
    for n, d in enumerate(delays, 1):
        assert 0.1 * 2 ** (n - 1) / 2 <= d <= 0.1 * 2 ** (n - 1) + 1e-6
    assert delays[-1] > delays[0]
    assert cpu < 0.5 * wall + 1.0, f"supervisor used {cpu:.2f} s CPU in {wall:.2f} s"


def test_hung_trainer_is_killed_after_the_hang_timeout_and_grace_and_restarted(tmp_path, root):
    run = Run(tmp_path, root, ["--hang-timeout", "1", "--hang-grace", "0.5", "--backoff-base", "0.05",
                               "--backoff-max", "0.1", "--every-steps", "5", TRAINER, "--steps", "40",
                               "--hang-at", "20"])
    wait_for(lambda: "hanging at step 20" in run.stdout(), 20, "the trainer to hang")
    restart = run.wait_event("restart", timeout=60)
    assert restart["reason"] == "hang"
    # Judged by the supervisor's own record, not by how soon this test saw it: a busy machine can only
    # delay each step, never make it early.
    [hang] = run.events("hang")
    assert hang["silent"] >= 1.0  # not before --hang-timeout
    kill = [e for e in run.events("kill") if e["pid"] == hang["pids"][0]]
    assert kill and kill[0]["time"] - hang["time"] >= 0.5 - 0.01  # SIGKILL only after --hang-grace
    hang_exit = run.events("exit")[0]
    assert hang_exit["reason"] == "hang" and hang_exit["signal"] in (signal.SIGTERM, signal.SIGKILL)
    assert run.wait() == 0, run.stderr()


def test_sigkill_of_the_supervisor_leaves_no_process_of_the_run(tmp_path, root):
    pidfile = str(tmp_path / "pids")
    run = Run(tmp_path, root, [PLAIN, "--children", "2", "--pidfile", pidfile])
    wait_for(lambda: os.path.exists(pidfile), 20, "the script and its children to start")
    pids = [int(p) for p in open(pidfile).read().split()]
    assert len(pids) == 3 and all(running(p) for p in pids)
    run.signal(signal.SIGKILL)
    run.proc.wait(5)
    # A deadline, not a timing target: the guard needs the CPU for a moment, which a busy machine delays.
    wait_for(lambda: not any(running(p) for p in pids), 20, f"processes {pids} to die")


def test_second_supervisor_on_the_same_dir_exits_locked(tmp_path, root):
    run = Run(tmp_path, root, [PLAIN])
    run.wait_event("spawn")
    second = ckptd("run", "--dir", root, PLAIN, "--crash")
    assert second.returncode == exitcodes.LOCKED
    assert f"pid {run.pid}" in second.stderr and "already supervises" in second.stderr
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.STOPPED_NO_CHECKPOINT


def test_unmodified_script_restarts_on_crash_and_gets_sigterm(tmp_path, root):
    marker = str(tmp_path / "crashed-once")
    pidfile = str(tmp_path / "pid")
    run = Run(tmp_path, root, [*FAST, PLAIN, "--crash-first", marker, "--pidfile", pidfile])
    run.wait_event("restart")
    wait_for(lambda: os.path.exists(pidfile), 20, "the second life")
    pid = int(open(pidfile).read().split()[0])
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.STOPPED_NO_CHECKPOINT
    last = run.events("exit")[-1]
    assert last["pid"] == pid and last["signal"] == signal.SIGTERM
    assert run.events("stop_requested")[0]["via"] == "SIGTERM"


def test_second_sigterm_forces_fast_stop(tmp_path, root):
    # the trainer hangs: it never honours the stop request, so only the fast path ends it quickly
    run = Run(tmp_path, root, ["--grace", "60", "--force-grace", "0.5", TRAINER, "--hang-at", "3"])
    wait_for(lambda: "hanging" in run.stdout(), 20, "the hang")
    run.signal(signal.SIGTERM)
    run.wait_event("stop_requested")
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.STOPPED_NO_CHECKPOINT
    assert run.events("stop_forced")


def test_no_restart_exit_code_ends_the_run_at_once(tmp_path, root):
    script = tmp_path / "exit9.py"
    script.write_text("import sys; sys.exit(9)\n")
    run = Run(tmp_path, root, ["--no-restart-exit-code", "9", str(script)])
    assert run.wait() == 9
    assert not run.events("restart") and run.events("exit")[0]["reason"] == "no_restart"


def test_several_trainers_all_get_the_stop_request(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--", sys.executable, LAUNCHER, "2", "--steps", "100000"])
    wait_for(lambda: run.stdout().count("start_step=0") == 2, 20, "two ranks")
    wait_for(lambda: len(_status(root).get("trainers", [])) == 2, 20, "two trainer connections")
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED, run.stderr()
    assert run.stdout().count("stopped at step") == 2
    assert run.events("checkpoint")[-1]["kind"] == "emergency"


def _status(root):
    import json

    r = ckptd("status", "--dir", root, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_interval_schedule_requests_checkpoints_and_sighup_reloads_it(tmp_path, root):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("every: 1\n")
    run = Run(tmp_path, root, [*FAST, "--config", str(cfg), TRAINER, "--steps", "100000"])
    run.wait_event("checkpoint", count=2, kind="manual")
    cfg.write_text("every: 3600\nkeep_last: 1\n")
    run.signal(signal.SIGHUP)
    reload = run.wait_event("reload")
    assert reload["changed"] == {"every": 3600.0, "keep_last": 1}
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED


def test_watcher_sees_external_deletion_and_retention_keeps_last(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--every-steps", "10", "--keep-last", "2", TRAINER, "--steps", "100000",
                               "--step-time", "0.01"])
    run.wait_event("checkpoint", count=4)
    removed = run.wait_event("checkpoint_removed", by="retention")
    assert removed["name"].startswith("step-")
    wait_for(lambda: len([n for n in os.listdir(root) if n.startswith("step-")]) <= 3, 10, "retention")
    assert freeze(run.pid)  # the supervisor's retention cannot race our rm (stopped, not just signalled)
    victim = sorted(n for n in os.listdir(root) if n.startswith("step-"))[0]
    import shutil

    shutil.rmtree(os.path.join(root, victim))
    run.signal(signal.SIGCONT)
    run.wait_event("checkpoint_removed", name=victim, by="someone else")
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED


def test_a_checkpoint_moved_aside_is_seen_and_the_directory_watch_stays_quiet(tmp_path, root):
    # A quarantine is a rename of a step directory into .quarantine/. The watch on the checkpoint
    # directory's top level sees it; a recursive watch also had watchdog print a RuntimeWarning about the
    # moved directory's watch into the user's log on every quarantine.
    run = Run(tmp_path, root, [*FAST, "--every-steps", "50", TRAINER, "--steps", "100000", "--step-time", "0.01"])
    first = run.wait_event("checkpoint")  # no retention: nothing but this test removes it
    run.wait_event("checkpoint", count=3)  # the supervisor's rescans have seen the first one by now
    os.makedirs(os.path.join(root, ".quarantine"), exist_ok=True)
    os.rename(os.path.join(root, first["name"]), os.path.join(root, ".quarantine", first["name"] + "-aside"))
    run.wait_event("checkpoint_removed", name=first["name"], by="someone else")
    os.mkdir(os.path.join(root, "unrelated"))  # one more top-level event after the move
    os.rmdir(os.path.join(root, "unrelated"))
    run.signal(signal.SIGTERM)
    assert run.wait(20) == exitcodes.PREEMPTED
    assert "Warning" not in run.stderr(), run.stderr()


def test_sd_notify_ready_watchdog_and_stopping(tmp_path, root):
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(20)
    run = Run(tmp_path, root, [*FAST, PLAIN], env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"})
    got: list[str] = []
    while "READY=1" not in got or got.count("WATCHDOG=1") < 2:
        got += sock.recv(4096).decode().split("\n")
    run.signal(signal.SIGTERM)
    while "STOPPING=1" not in got:
        got += sock.recv(4096).decode().split("\n")
    assert any(x.startswith("STATUS=") for x in got)
    run.wait(10)
    sock.close()


def test_long_checkpoint_dir_puts_the_socket_elsewhere_and_records_it(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    root = str(deep / "ck")
    xdg = tempfile.mkdtemp(prefix="x", dir="/tmp")  # short, as a real XDG_RUNTIME_DIR (/run/user/UID) is
    try:
        run = Run(tmp_path, root, [*FAST, TRAINER, "--steps", "100000"], env={"XDG_RUNTIME_DIR": xdg})
        try:
            wait_for(lambda: len(_status(root).get("trainers", [])) == 1, 60, "the trainer to connect")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status: {_status(root)}; stderr:\n{run.stderr()}") from None
        recorded = open(os.path.join(root, ".ckptd", "control.path")).read().strip()
        assert recorded.startswith(xdg + os.sep)  # under $XDG_RUNTIME_DIR, not /tmp
        assert len(recorded.encode()) <= 107 and os.path.exists(recorded)
        assert oct(os.stat(os.path.dirname(recorded)).st_mode & 0o777) == "0o700"
        assert oct(os.stat(recorded).st_mode & 0o777) == "0o600"
        run.signal(signal.SIGTERM)
        assert run.wait(10) == exitcodes.PREEMPTED
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


def test_supervisor_stays_small_and_never_loads_torch(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--every", "60", "--cron", "0 3 * * *", "--keep-last", "2",
                               TRAINER, "--steps", "100000", "--step-time", "0.02"])
    wait_for(lambda: len(_status(root).get("trainers", [])) == 1, 20, "the trainer to connect")
    rss = psutil.Process(run.pid).memory_info().rss
    maps = open(f"/proc/{run.pid}/maps").read()
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED
    assert rss < 60 * 2**20, f"supervisor RSS {rss / 2**20:.1f} MiB"
    assert "torch" not in maps


def test_supervisor_modules_do_not_import_torch():
    code = ("import sys, ckptd.cli as c; c.build_parser(); "
            "import ckptd.supervisor.loop, ckptd.store, ckptd.retention, ckptd.supervisor.client; "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sigusr1_checkpoints_and_continues(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, TRAINER, "--steps", "100000"])
    wait_for(lambda: len(_status(root).get("trainers", [])) == 1, 20, "the trainer to connect")
    run.signal(signal.SIGUSR1)
    assert run.wait_event("checkpoint", kind="manual")
    assert run.proc.poll() is None  # still training
    run.signal(signal.SIGTERM)
    assert run.wait(10) == exitcodes.PREEMPTED


def test_configured_requeue_signal_checkpoints_and_exits_85_with_json_logs(tmp_path, root):
    import json

    run = Run(tmp_path, root, [*FAST, "--requeue-signal", "USR1", "--log-format", "json", TRAINER, "--steps", "100000"])
    wait_for(lambda: len(_status(root).get("trainers", [])) == 1, 20, "the trainer to connect")
    run.signal(signal.SIGUSR1)
    assert run.wait(10) == exitcodes.PREEMPTED
    assert run.events("stop_requested")[0]["reason"] == "SIGUSR1 (requeue)"
    lines = [json.loads(line) for line in run.stderr().splitlines() if line.startswith("{")]
    assert {"start", "spawn", "stop_requested", "exit", "end"} <= {x["event"] for x in lines}
    assert all({"time", "level", "msg"} <= set(x) for x in lines)


def test_journal_and_status_survive_a_killed_supervisor_and_the_run_id_is_kept(tmp_path, root):
    run = Run(tmp_path, root, [*FAST, "--every-steps", "5", TRAINER, "--steps", "100000"])
    run.wait_event("checkpoint")
    run.kill()
    status = ckptd("status", "--dir", root)
    assert status.returncode == 0 and "not running" in status.stdout
    again = Run(tmp_path, root, [*FAST, TRAINER, "--steps", "1"], name="again")
    assert again.wait() == 0
    starts = journal(root, "start")
    assert len(starts) == 2 and starts[0]["run_id"] == starts[1]["run_id"]


def test_a_checkpoint_committed_just_before_exit_is_journaled_even_unreported(tmp_path, root):
    """The exit is judged only after a rescan: a checkpoint that lands as the child exits (no `saved`
    message, faster than the watcher's debounce) is still journaled and becomes the last checkpoint."""
    script = tmp_path / "commit_and_exit.py"
    script.write_text(
        "import os\n"
        "from ckptd import store\n"
        "with store.PendingCheckpoint(os.environ['CKPTD_DIR'], 7) as pc:\n"
        "    pc.write_file('state.json', [b'{}'])\n"
        "    pc.commit(kind='emergency')\n"
    )
    run = Run(tmp_path, root, [*FAST, str(script)])
    assert run.wait() == 0, run.stderr()
    events = run.events("checkpoint")
    assert [(e["step"], e["kind"]) for e in events] == [(7, "emergency")], run.events()
    status = ckptd("status", "--dir", root, "--json")
    import json

    assert json.loads(status.stdout)["last_checkpoint"]["step"] == 7, status.stdout
