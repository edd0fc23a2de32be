"""The control channel over a long, quiet run: every supervisor feature still works after idling past every
internal timeout (send bound 2 s, heartbeat 1 s, hello 10 s), and a hang is handled in seconds.

These tests run the bundled example (the real library, real torch) under the real `ckptd run`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ckptd import exitcodes
from fixtures.sup_helpers import FAST, TRAINER, Run, ckptd, freeze, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "train_toy.py")
IDLE = 12.0  # > hello timeout (10 s), > the channel's send bound (2 s), > many heartbeat periods (1 s)


def _status(root: str, required: bool = True) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    if r.returncode != 0 and not required:
        return {}
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _trainer_pid(root: str):
    st = _status(root, required=False)  # not yet started: no run directory
    return st["trainers"][0]["pid"] if st.get("trainers") else None


@pytest.mark.slow
def test_a_long_quiet_run_keeps_its_channel_and_every_feature_works_then_a_hang_is_replaced_in_seconds(tmp_path):
    """At least 30 s: scheduled saves, save --wait, SIGUSR1 and status after 12 s of silence, then a hang."""
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--grace", "60", "--every", str(IDLE), "--hang-timeout", "4",
                               "--hang-grace", "2", TOY, "--steps", "1000000", "--step-delay", "0.02",
                               "--every-steps", "1000000"])
    wait_for(lambda: _trainer_pid(root), 60, "the trainer to connect")
    connected = time.monotonic()
    # 1. Scheduled saves every IDLE seconds: between two of them the supervisor says nothing to the trainer
    #    for IDLE seconds, which used to drop the channel after 2 s. The schedule counts from the supervisor's
    #    start, not from when this test saw the trainer connect: two firings (two requests) are IDLE apart.
    first = run.wait_event("checkpoint", timeout=IDLE + 60)
    sched = run.wait_event("checkpoint", count=2, timeout=IDLE + 30)
    assert first["kind"] == sched["kind"] == "manual", (first, sched)  # no periodic saves: both from the schedule
    assert first["request_id"] and sched["request_id"] and first["request_id"] != sched["request_id"], (first, sched)
    assert "disconnected" not in run.stderr(), run.stderr()
    # 2. ckptd save --wait, answered with the committed checkpoint.
    r = ckptd("save", "--wait", "--dir", root, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    saved_steps = [e["step"] for e in run.events("checkpoint")]
    # 3. `ckptd status` knows the live step: at least the step that was just saved, i.e. not stale.
    st = _status(root)
    assert st["state"] == "running" and st["step"] >= saved_steps[-1], (st, saved_steps)
    # 4. SIGUSR1 = checkpoint now.
    before = len(run.events("checkpoint"))
    run.signal(signal.SIGUSR1)
    run.wait_event("checkpoint", count=before + 1, timeout=30)
    # 5. Idle again past every timeout, then the status step keeps up with the trainer.
    step_a = _status(root)["step"]
    wait_for(lambda: time.monotonic() - connected >= 2 * IDLE and _status(root)["step"] > step_a, 3 * IDLE,
             "training to go on while the supervisor is silent")
    assert len(_status(root)["trainers"]) == 1
    # 6. A hang (the trainer stops making progress): dumped, SIGKILLed after the 2 s hang grace, not the
    #    60 s preemption grace, and restarted from the newest checkpoint.
    pid = _trainer_pid(root)
    os.kill(pid, signal.SIGSTOP)
    hang = run.wait_event("hang", timeout=30)
    assert hang["pids"] == [pid]
    stacks = run.wait_event("hang_stacks", timeout=10)
    assert "stopped" in stacks["stacks"], stacks  # SIGSTOP: no handler can run, and we say why
    restart = run.wait_event("restart", timeout=60)
    assert restart["reason"] == "hang"
    # a stopped process is SIGKILLed after the 2 s hang grace: by the supervisor's record, after it and long
    # before the 60 s preemption grace would have run out, however busy the machine
    kill = [e for e in run.events("kill") if e["pid"] == pid]
    assert kill and 2.0 - 0.01 <= kill[0]["time"] - hang["time"] < 60, (kill, hang)
    resumed = run.wait_event("resumed", timeout=60)
    assert resumed["step"] == max(e["step"] for e in run.events("checkpoint"))
    # 7. The new life's channel works too: status ends the run's story, then a clean stop.
    wait_for(lambda: _trainer_pid(root) not in (None, pid), 60, "the new trainer to connect")
    wait_for(lambda: (_status(root)["step"] or 0) > resumed["step"], 60, "the new trainer to train")
    r = ckptd("save", "--wait", "--dir", root, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    run.signal(signal.SIGTERM)
    assert run.wait(90) == exitcodes.PREEMPTED, run.stderr()
    assert run.events("checkpoint")[-1]["kind"] == "emergency"


def test_a_hung_trainer_dumps_every_threads_python_stack_into_the_log_and_journal(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--grace", "60", "--hang-timeout", "1", "--hang-grace", "3",
                               TRAINER, "--steps", "40", "--hang-at", "20"])
    stacks = run.wait_event("hang_stacks", timeout=30)
    text = stacks["stacks"]
    assert "most recent call first" in text and "sup_trainer.py" in text and "in main" in text, text
    assert "_read_loop" in text and "Current thread" in text, text  # every thread, not only the main one
    assert "sup_trainer.py" in run.stderr()  # and in the log
    assert run.wait(60) == 0, run.stderr()
    # the dump file is removed once read
    assert not [n for n in os.listdir(os.path.join(root, ".ckptd")) if n.startswith("stacks-")]


def test_a_trainer_that_closed_is_not_watched_for_hangs_while_its_process_exits(tmp_path):
    """ck.close() ends the conversation: an interpreter exit that then takes longer than --hang-timeout (torch's
    teardown on a busy machine) is not a hang, and the finished run is not restarted."""
    root = str(tmp_path / "ck")
    script = tmp_path / "slow_exit.py"
    # torch.distributed.checkpoint is imported first: the library imports it after connecting, which on a busy
    # machine can take longer than the hang timeout by itself (choose it longer than a restore, the docs say)
    script.write_text("import time, torch.distributed.checkpoint, ckptd\nck = ckptd.Checkpointer()\nck.restore()\n"
                      "ck.step(1)\nck.close()\nprint('closed', flush=True)\ntime.sleep(8)\n")
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--hang-timeout", "3", "--hang-grace", "1", str(script)])
    assert run.wait(120) == 0, run.stderr()
    assert not run.events("hang") and not run.events("restart"), run.events()
    assert run.stdout().count("closed") == 1


def test_a_script_failing_before_its_first_step_gives_up_after_3_tries_and_shows_its_stderr(tmp_path):
    root = str(tmp_path / "ck")
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('loading config', file=sys.stderr)\nimport no_such_module_ckptd\n")
    run = Run(tmp_path, root, ["--backoff-base", "0.05", "--backoff-max", "0.1", str(script)])
    assert run.wait(60) == exitcodes.GAVE_UP, run.stderr()
    assert len(run.events("spawn")) + len(run.events("restart")) == 3
    give_up = run.events("give_up")[0]
    assert "3 times in a row before its first step" in give_up["why"]
    assert any("No module named 'no_such_module_ckptd'" in line for line in give_up["stderr_tail"]), give_up
    err = run.stderr()
    assert "never connected to the supervisor" in err and "begins from scratch" in err
    assert err.count("the script's last stderr lines") == 1


def test_a_stop_before_the_first_step_says_so(tmp_path):
    root = str(tmp_path / "ck")
    script = tmp_path / "slow_start.py"
    script.write_text("import time, ckptd\nck = ckptd.Checkpointer()\nprint('loading', flush=True)\n"
                      "time.sleep(600)\n")
    run = Run(tmp_path, root, ["--grace", "1", "--force-grace", "1", str(script)])
    wait_for(lambda: _trainer_pid(root), 60, "the trainer to connect")
    run.signal(signal.SIGTERM)
    assert run.wait(30) == exitcodes.STOPPED_NO_CHECKPOINT, run.stderr()
    end = run.events("end")[-1]
    assert "before the trainer reached its first step" in run.stderr(), run.stderr()
    assert end["exit_code"] == exitcodes.STOPPED_NO_CHECKPOINT


def test_two_save_waits_merged_into_one_checkpoint_are_both_answered(tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, TOY, "--steps", "1000000", "--step-delay", "0.05", "--every-steps", "1000000"])
    pid = wait_for(lambda: _trainer_pid(root), 60, "the trainer to connect")
    # Both requests reach the trainer before its next step whatever the two clients' start-up takes: it is
    # stopped until the supervisor has sent both, and takes what arrived together in one step.
    assert freeze(pid)
    cmd = [sys.executable, "-m", "ckptd", "save", "--wait", "--dir", root, "--timeout", "60"]
    clients = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        wait_for(lambda: run.stderr().count("checkpoint requested by") == 2, 60, "both requests sent to the trainer")
    finally:
        os.kill(pid, signal.SIGCONT)
    outs = [c.communicate(timeout=90) for c in clients]
    assert [c.returncode for c in clients] == [0, 0], outs
    merged = [e for e in run.events("checkpoint") if "," in str(e.get("request_id") or "")]
    assert merged, run.events("checkpoint")  # the two requests were served by one checkpoint
    run.signal(signal.SIGTERM)
    assert run.wait(60) == exitcodes.PREEMPTED
