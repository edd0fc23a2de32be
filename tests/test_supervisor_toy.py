"""Acceptance: `ckptd run` with the real trainer library (examples/train_toy.py, torch)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ckptd import exitcodes, store
from fixtures.sup_helpers import Run, ckptd, freeze, toy_digest, toy_reference, wait_for

pytest.importorskip("torch")
TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_toy.py")
STEPS = 200
FAST = ["--backoff-base", "0.05", "--backoff-max", "0.2"]


def digest(text: str) -> str:
    return toy_digest(text, STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return toy_reference(str(tmp_path_factory.mktemp("ref")), STEPS)


def test_sigterm_commits_emergency_checkpoint_exits_85_and_resume_is_bit_identical(tmp_path, reference):
    root = str(tmp_path / "ck")
    grace = 20
    # Slow steps from step 10 on leave 19 s for the SIGTERM to land before the end, however slowly this test
    # reacts; the stop ends the run early anyway.
    run = Run(tmp_path, root, [*FAST, "--grace", str(grace), TOY, "--steps", str(STEPS), "--every-steps", "10",
                               "--step-delay", "0.1"])
    run.wait_event("checkpoint", timeout=60, step=10)
    sent = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(grace + 5) == exitcodes.PREEMPTED, run.stderr()
    assert time.monotonic() - sent < grace
    emergency = run.events("checkpoint")[-1]
    assert emergency["kind"] == "emergency" and 10 <= emergency["step"] < STEPS
    stopping = [e for e in run.events("exit")][-1]
    assert stopping["step"] == emergency["step"]  # the checkpoint holds the step the trainer reached
    again = Run(tmp_path, root, [*FAST, TOY, "--steps", str(STEPS), "--every-steps", "50"], name="again")
    assert again.wait(120) == 0, again.stderr()
    assert again.events("resumed")[-1]["step"] == emergency["step"]  # zero lost steps
    assert digest(again.stdout()) == reference


def test_sigkill_of_the_trainer_restarts_from_the_latest_checkpoint_and_ends_identical(tmp_path, reference):
    root = str(tmp_path / "ck")
    every = 25
    run = Run(tmp_path, root, [*FAST, TOY, "--steps", str(STEPS), "--every-steps", str(every), "--step-delay", "0.05"])
    spawn = run.wait_event("spawn")
    run.wait_event("checkpoint", timeout=60, step=every)
    # Stopped first, so no checkpoint can land between this look and the kill: the restart must resume from
    # exactly this one. (How many steps that loses, up to the interval plus the save in flight, grows with load.)
    assert freeze(spawn["pid"]), "the trainer ended before the test could stop it"
    newest = store.latest_valid(root).step
    os.kill(spawn["pid"], signal.SIGKILL)
    restart = run.wait_event("restart", timeout=20)
    assert restart["resume_step"] == newest >= every and restart["lost_steps"] == max(0, restart["crash_step"] - newest)
    assert run.wait(120) == 0, run.stderr()
    assert run.events("resumed")[-1]["step"] == restart["resume_step"]
    status = json.loads(ckptd("status", "--dir", root, "--json").stdout)
    assert status["restarts"] == 1 and status["last_exit"]["reason"] == "finished"
    assert digest(run.stdout()) == reference


def test_save_wait_and_stop_wait_with_the_toy_trainer(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--grace", "20", TOY, "--steps", "100000", "--every-steps", "100000",
                               "--step-delay", "0.01"])

    def connected():
        r = ckptd("status", "--dir", root, "--json")
        return r.returncode == 0 and json.loads(r.stdout).get("trainers")

    wait_for(connected, 60, "the toy trainer to connect")
    saved = ckptd("save", "--wait", "--dir", root)
    assert saved.returncode == 0 and "manual" in saved.stdout, saved.stderr
    assert any(e["kind"] == "manual" for e in run.events("checkpoint"))
    stopped = ckptd("stop", "--wait", "--dir", root)
    assert stopped.returncode == 0 and "exit code 85" in stopped.stdout, stopped.stderr
    assert run.wait(20) == exitcodes.PREEMPTED
    assert run.events("checkpoint")[-1]["kind"] == "emergency"


def test_a_trainer_sigkill_under_bash_tee_leaves_the_users_tee_alone_and_ends_identical(tmp_path, reference):
    """`ckptd run ... > >(tee log)`: bash forks `tee`, then execs ckptd in the same process, so `tee` is the
    supervisor's child without being part of the run. The restart after a SIGKILL of the trainer must neither
    kill it (the next life would die of a broken pipe at its first print) nor wait for it."""
    import shlex
    import subprocess
    import sys

    import psutil

    from fixtures.sup_helpers import journal, running

    root, log, err = str(tmp_path / "ck"), str(tmp_path / "log"), str(tmp_path / "err")
    line = (f"{shlex.quote(sys.executable)} -m ckptd run --dir {shlex.quote(root)} {' '.join(FAST)} "
            f"{shlex.quote(TOY)} --steps {STEPS} --every-steps 25 --step-delay 0.05 > >(tee {shlex.quote(log)})")
    with open(err, "w") as err_file:
        proc = subprocess.Popen(["bash", "-c", line], stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
    try:
        spawn = wait_for(lambda: journal(root, "spawn"), 60, "the trainer to start")[0]
        tee = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "tee"]
        assert len(tee) == 1 and tee[0].ppid() == journal(root, "start")[0]["pid"], "no tee child of ckptd to watch"
        tee = tee[0]
        wait_for(lambda: journal(root, "checkpoint"), 60, "the first checkpoint")
        os.kill(spawn["pid"], signal.SIGKILL)
        wait_for(lambda: journal(root, "resumed"), 60, "the restarted trainer to resume")
        assert running(tee.pid), "the user's tee was killed"
        assert proc.wait(120) == 0, open(err).read()
        stderr = open(err).read()
        assert "leftover" not in stderr, stderr
        [restart] = journal(root, "restart")
        assert restart["reason"] == "signal" and journal(root, "resumed")[-1]["step"] == restart["resume_step"]
        # tee ends when ckptd's end closes its input: the log holds both lives, then the finished run.
        wait_for(lambda: not running(tee.pid), 30, "tee to finish its log")
        text = open(log).read()
        assert "start_step=0" in text and f"start_step={restart['resume_step']}" in text, text
        assert digest(text) == reference
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
