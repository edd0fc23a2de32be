"""What `ckptd run` says in routine situations: expected deletions, a restart whose trainer is still starting,
a restart after a life that reported no step. Real `ckptd run` processes with the fixture trainers."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from ckptd import exitcodes, store
from fixtures.sup_helpers import FAST, PLAIN, TOY, TRAINER, Run, wait_for


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "ck")


def _lines_naming(stderr: str, name: str) -> list[str]:
    """The supervisor's log lines about ``name`` other than its commit/appearance."""
    return [x for x in stderr.splitlines() if name in x and "ckptd[" in x
            and "checkpoint committed" not in x and "checkpoint appeared" not in x]


def test_supervisor_retention_says_each_deletion_once(tmp_path, root):
    # The torch-free trainer has no retention of its own: every deletion is the supervisor's.
    run = Run(tmp_path, root, [*FAST, "--every-steps", "10", "--keep-last", "2", TRAINER, "--steps", "100000"])
    removed = [run.wait_event("checkpoint_removed", count=i, by="retention") for i in (1, 2, 3)]
    run.signal(signal.SIGTERM)
    assert run.wait(20) == exitcodes.PREEMPTED
    err = run.stderr()
    for e in removed:
        assert len(_lines_naming(err, e["name"])) == 1, (e["name"], _lines_naming(err, e["name"]))


def test_the_trainers_own_retention_is_expected_and_journaled_without_a_log_line(tmp_path, root):
    # examples/train_toy.py keeps its newest 3 (Checkpointer(keep_last=3)); the supervisor has no rule.
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", TOY, "--steps", "120", "--every-steps", "10",
                               "--step-delay", "0.04"])
    assert run.wait(120) == 0, run.stderr()
    removed = run.events("checkpoint_removed")
    assert removed and {e["by"] for e in removed} == {"trainer retention"}, removed
    err = run.stderr()
    assert "not by the supervisor" not in err, err
    for e in removed:
        assert _lines_naming(err, e["name"]) == [], _lines_naming(err, e["name"])


def test_a_schedule_during_a_restart_says_the_trainer_is_starting(tmp_path, root):
    gate = tmp_path / "gate"
    run = Run(tmp_path, root, [*FAST, "--every", "1", "--every-steps", "10", TRAINER, "--steps", "100000",
                               "--crash-at", "30", "--connect-gate", str(gate)])
    run.wait_event("restart")

    def skipped_after_restart():
        err = run.stderr()
        after = err[err.index("restart #1"):] if "restart #1" in err else ""
        return [x for x in after.splitlines() if "checkpoint request from schedule" in x]

    [line, *_] = wait_for(skipped_after_restart, 30, "a scheduled checkpoint while the restarted trainer starts")
    assert " info: " in line and "skipped: the trainer is starting" in line, line
    gate.touch()
    run.wait_event("resumed")
    run.signal(signal.SIGTERM)
    assert run.wait(20) == exitcodes.PREEMPTED
    err = run.stderr()
    assert "no trainer is connected" not in err, err


def test_a_restart_after_a_life_that_reported_no_step_says_where_it_resumes_without_none(tmp_path, root):
    with store.PendingCheckpoint(root, 40) as pc:  # a checkpoint from an earlier run
        pc.write_file("state.json", [json.dumps({"step": 40}).encode()])
        pc.commit(kind="periodic")
    marker = tmp_path / "crashed"
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", PLAIN, "--crash-first", str(marker)])
    restart = run.wait_event("restart")
    assert restart["resume_step"] == 40 and restart["lost_steps"] is None
    line = next(x for x in run.stderr().splitlines() if "restart #1" in x)
    assert "None" not in line and re.search(r"resuming from step 40 \(the trainer reported no step", line), line
    run.signal(signal.SIGTERM)
    assert run.wait(20) == exitcodes.STOPPED_NO_CHECKPOINT


def test_status_recent_lines_of_a_preemption_all_say_something(tmp_path, root):
    """`ckptd status` lists the last journal events; a cloud notice (and a backoff, a reload...) has none of the
    fields a line used to show, which printed a bare `notice`."""
    from ckptd.supervisor import notices
    from fixtures.fake_metadata import FakeMetadata, iso
    from fixtures.sup_helpers import ckptd

    imds = FakeMetadata("aws")
    try:
        run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--notices", "aws", "--notice-endpoint", imds.url,
                                   "--notice-poll", "0.1", "--every-steps", "50", TRAINER, "--steps", "100000"],
                  env={notices.LOOPBACK_ONLY_ENV: "1"})
        run.wait_event("checkpoint")
        imds.set(instance_action={"action": "terminate", "time": iso(time.time() + 20)})
        assert run.wait(30) == exitcodes.PREEMPTED
    finally:
        imds.close()
    r = ckptd("status", "--dir", root)
    assert r.returncode == 0, r.stderr
    recent = r.stdout.split("recent:\n", 1)[1].splitlines()
    assert any(" notice " in x for x in recent), r.stdout
    for line in recent:
        assert "=" in line, line  # `TIME  EVENT  key=value ...`, never a bare event name
    [notice] = [x for x in recent if " notice " in x]
    assert "source=aws" in notice and "action=stop" in notice, notice


def test_a_hang_dumps_the_stacks_of_every_rank_not_only_the_silent_one(tmp_path, root):
    """Rank 1 SIGSTOPped: it cannot dump its own stacks; the stacks of its peer (in a real job, blocked in the
    collective waiting for it) are what show where the job stands."""
    from fixtures.sup_helpers import LAUNCHER, ckptd

    run = Run(tmp_path, root, [*FAST, "--grace", "60", "--hang-timeout", "2", "--hang-grace", "3", "--metrics-addr",
                               "off", LAUNCHER, "2", "--steps", "100000"])

    def trainers():
        r = ckptd("status", "--dir", root, "--json")
        st = json.loads(r.stdout) if r.returncode == 0 else {}
        return st.get("trainers") if len(st.get("trainers") or []) == 2 else None

    ranks = {t["rank"]: t["pid"] for t in wait_for(trainers, 30, "both ranks to connect")}
    os.kill(ranks[1], signal.SIGSTOP)
    hang = run.wait_event("hang", timeout=30)
    assert hang["pids"] == [ranks[1]]
    stacks = {e["pid"]: e for e in [run.wait_event("hang_stacks", timeout=15, count=2), *run.events("hang_stacks")]}
    assert set(stacks) == {ranks[0], ranks[1]}, stacks
    assert "stopped" in stacks[ranks[1]]["stacks"] and stacks[ranks[1]]["silent"] is True
    assert "sup_trainer.py" in stacks[ranks[0]]["stacks"] and stacks[ranks[0]]["silent"] is False
    run.wait_event("restart", timeout=30)
    run.signal(signal.SIGTERM)
    assert run.wait(30) in (exitcodes.PREEMPTED, exitcodes.STOPPED_NO_CHECKPOINT)


def test_the_restore_line_is_one_write_so_ranks_sharing_stderr_cannot_glue_their_lines(tmp_path):
    """strace shows the write(2) calls: `ckptd: resumed from ...` and its newline must be one."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("strace"):
        pytest.skip("needs strace")
    script = tmp_path / "restore.py"
    script.write_text(
        "import sys, torch, ckptd\n"
        "m = torch.nn.Linear(2, 2)\n"
        "ck = ckptd.Checkpointer(model=m, dir=sys.argv[1], handle_signals=False, save_on_close=False)\n"
        "if ck.restore() == 0:\n"
        "    ck.step(1); ck.save(block=True)\n"
        "ck.close()\n")
    ck = str(tmp_path / "ck")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    subprocess.run([sys.executable, str(script), ck], check=True, env=env, capture_output=True, timeout=120)
    trace = tmp_path / "trace.txt"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=write", "-s", "4096", "-o", str(trace), sys.executable,
                        str(script), ck], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ckptd: resumed from step 1" in r.stderr, r.stderr
    writes = [x for x in trace.read_text().splitlines() if "write(2," in x and "resumed from step 1" in x]
    assert len(writes) == 1 and re.search(r'resumed from step 1: [^"]*\\n"', writes[0]), writes


def test_ranks_that_exit_0_after_their_emergency_checkpoint_are_a_clean_stop_not_a_finished_run(tmp_path, root):
    """What torchrun's ranks do under `ckptd run` (distributed.clean_stop_exit_code): report `stopping` with 85,
    then exit 0 so torchrun ends quietly. The supervisor exits 85 and says so without a warning."""
    from fixtures.sup_helpers import LAUNCHER, ckptd

    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--every-steps", "20", LAUNCHER, "2",
                               "--steps", "100000", "--stop-exit-code", "0"])
    run.wait_event("checkpoint")
    r = ckptd("stop", "--dir", root, "--wait", timeout=60)
    assert r.returncode == 0 and "exit code 85" in r.stdout, r.stdout + r.stderr
    assert run.wait(30) == exitcodes.PREEMPTED
    [exit_] = run.events("exit")
    assert exit_["code"] == 0 and exit_["reason"] == "preempted", exit_
    err = run.stderr()
    assert not [x for x in err.splitlines() if "ckptd[" in x and (" warning: " in x or " error: " in x)], err
    assert "its ranks stopped after the emergency checkpoint" in err and "training finished" not in err, err
