"""Cloud preemption notices end to end: the real `ckptd run`, real trainers, a strict fake metadata service per
cloud on 127.0.0.1 (tests/fixtures/fake_metadata.py). Every run here has CKPTD_NOTICES_LOOPBACK_ONLY=1: no test
can reach 169.254.169.254 or any address but loopback, even by mistake."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from ckptd import exitcodes, store
from ckptd.supervisor import notices
from fixtures.fake_metadata import FakeMetadata, iso
from fixtures.sup_helpers import TRAINER, Run, ckptd, toy_digest, toy_reference, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "train_toy.py")
STEPS = 200
ENV = {notices.LOOPBACK_ONLY_ENV: "1"}
FAST = ["--backoff-base", "0.05", "--backoff-max", "0.2", "--force-grace", "1"]
CLOUDS = ("aws", "gcp", "azure")


def digest(text: str) -> str:
    return toy_digest(text, STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return toy_reference(str(tmp_path_factory.mktemp("ref")), STEPS)


@pytest.fixture
def fake():
    servers: list[FakeMetadata] = []

    def make(cloud: str) -> FakeMetadata:
        servers.append(FakeMetadata(cloud))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def polling(cloud: str, svc: FakeMetadata, poll: float = 0.1) -> list[str]:
    return ["--notices", cloud, "--notice-endpoint", svc.url, "--notice-poll", str(poll)]


def announce(cloud: str, svc: FakeMetadata, lead: float) -> str | None:
    """Make the fake announce a preemption ``lead`` seconds ahead (GCP: the run's --notice-gcp-deadline)."""
    if cloud == "aws":
        svc.set(instance_action={"action": "terminate", "time": iso(time.time() + lead)})
    elif cloud == "gcp":
        svc.set_gcp("preempted", "TRUE")
    else:
        return svc.add_azure_event("Preempt", time.time() + lead)
    return None


def status(root: str) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_auto_on_this_machine_starts_no_poller_and_connects_nowhere(tmp_path, fake):
    """Traced with strace: the supervisor and everything it starts make no AF_INET/AF_INET6 connect() at all.

    The positive control (DMI data saying AWS, endpoint at a local fake) shows the same trace does catch a
    poller's connection, so the check can fail.
    """
    if notices.detect()[0] is not None:
        pytest.skip("this machine's DMI data names a cloud: auto would poll its metadata service")
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        pytest.skip("strace is not installed")
    aws_dmi = tmp_path / "dmi"
    aws_dmi.mkdir()
    (aws_dmi / "sys_vendor").write_text("Amazon EC2\n")
    imds = fake("aws")
    traces = {}
    for name, env, extra in (("plain", {}, []),
                             ("control", {**ENV, notices.DMI_DIR_ENV: str(aws_dmi)}, ["--notice-endpoint", imds.url])):
        trace = tmp_path / f"{name}.trace"
        run = Run(tmp_path, str(tmp_path / name), [*extra, "--notice-poll", "0.05", TRAINER, "--steps", "60",
                                                   "--step-time", "0.01"],
                  name=name, env=env,
                  prefix=["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect", "-o", str(trace)])
        assert run.wait(60) == 0, run.stderr()
        traces[name] = (trace.read_text(), run.stderr())
    plain, plain_err = traces["plain"]
    assert "AF_UNIX" in plain  # the trace works: the trainer's connection to the control socket is in it
    assert "AF_INET" not in plain, [line for line in plain.splitlines() if "AF_INET" in line]
    assert "cloud preemption notices: auto:" in plain_err and "polling" not in plain_err
    control, control_err = traces["control"]
    port = imds.server.server_address[1]
    assert f"sin_port=htons({port})" in control and "127.0.0.1" in control, control_err
    assert "polling aws" in control_err and imds.count("instance-action") > 0


@pytest.mark.parametrize("cloud", CLOUDS)
def test_a_notice_commits_an_emergency_checkpoint_before_the_deadline_and_the_resume_is_bit_identical(
        tmp_path, reference, fake, cloud):
    svc = fake(cloud)
    if cloud == "azure":
        svc.add_azure_event("Preempt", time.time() + 60, resources=["a-neighbour-vm"])  # not ours: ignored
    root = str(tmp_path / "ck")
    # Slow steps: 19 s from the first checkpoint to the end, for the notice to be served and stop the run
    # however slowly this test and the poller get the CPU; the stop ends the run early anyway.
    run = Run(tmp_path, root, [*FAST, *polling(cloud, svc), "--notice-gcp-deadline", "30", TOY, "--steps", str(STEPS),
                               "--every-steps", "10", "--step-delay", "0.1"], env=ENV)
    run.wait_event("checkpoint", timeout=60, step=10)
    assert not run.events("stop_requested")  # the neighbour's event stopped nothing
    event_id = announce(cloud, svc, 30)
    assert run.wait(40) == exitcodes.PREEMPTED, run.stderr()
    notice = [e for e in run.events("notice") if e.get("source") == cloud]
    assert len(notice) == 1 and notice[0]["action"] == "stop" and 25 <= notice[0]["lead_seconds"] <= 30, notice
    result = run.events("notice_result")[-1]
    assert result["committed"] and result["before_deadline"] and result["margin_seconds"] > 20, result
    emergency = run.events("checkpoint")[-1]
    assert emergency["kind"] == "emergency" and emergency["step"] == result["step"] and 10 <= result["step"] < STEPS
    if cloud == "azure":
        assert svc.acks == [{"StartRequests": [{"EventId": event_id}]}]
        assert "a-neighbour-vm" in run.stderr() and run.stderr().count("a-neighbour-vm") == 1
    assert not svc.violations, svc.violations
    st = status(root)
    assert st["notice"]["pending"] is False and st["notice"]["committed"] is True
    if cloud != "aws":
        return  # the resume does not depend on where the notice came from: one cloud's run checks it (~10 s of CPU)
    again = Run(tmp_path, root, [*FAST, "--notices", "off", TOY, "--steps", str(STEPS), "--every-steps", "50"],
                name="again", env=ENV)
    assert again.wait(120) == 0, again.stderr()
    assert again.events("resumed")[-1]["step"] == emergency["step"]  # zero lost steps
    assert digest(again.stdout()) == reference


def test_a_deadline_too_short_for_a_save_starts_none_keeps_the_last_checkpoint_and_says_why(tmp_path, fake):
    gce = fake("gcp")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, *polling("gcp", gce), "--notice-gcp-deadline", "0.5", TOY, "--steps", "100000",
                               "--every-steps", "50", "--step-delay", "0.02"], env=ENV)
    run.wait_event("checkpoint", timeout=60, step=50)
    gce.set_gcp("preempted", "TRUE")
    assert run.wait(30) == exitcodes.STOPPED_NO_CHECKPOINT, run.stderr()
    skipped = run.events("emergency_skipped")
    assert len(skipped) == 1 and "not starting the emergency checkpoint" in skipped[0]["reason"], skipped
    assert "is kept" in skipped[0]["reason"] and "a save needs" in skipped[0]["reason"]
    result = run.events("notice_result")[-1]
    assert result["committed"] is False and "not starting" in result["no_checkpoint"]
    assert "not starting the emergency checkpoint" in run.stderr()  # the trainer's log line
    infos = store.list_checkpoints(root)
    assert infos and all(i.valid and i.kind == "periodic" for i in infos)  # the last committed one stays
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # nothing was started


def test_a_notice_during_restart_backoff_exits_at_once_and_starts_no_child(tmp_path, fake):
    imds = fake("aws")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, ["--backoff-base", "30", "--backoff-max", "30", *polling("aws", imds),
                               TRAINER, "--steps", "1000", "--crash-at", "5"], env=ENV)
    backoff = run.wait_event("backoff", timeout=30)
    announce("aws", imds, 100)
    assert run.wait(40) == exitcodes.STOPPED_NO_CHECKPOINT, run.stderr()
    # by the supervisor's own record: it ended inside the 15-30 s backoff, not after it
    assert run.events("end")[-1]["time"] < backoff["time"] + backoff["delay"]
    assert len(run.events("spawn")) == 1 and not run.events("restart")
    assert run.events("notice")[-1]["state"] == "backoff"
    assert run.events("notice_result")[-1]["committed"] is False
    assert "stopped between restarts" in run.stderr()


def test_a_notice_before_the_first_step_is_pending_in_status_and_ends_at_the_deadline(tmp_path, fake):
    gce = fake("gcp")
    script = tmp_path / "slow_start.py"
    script.write_text("import os, time\nfrom ckptd import channel, env\n"
                      "ch = channel.connect_from_env(os.environ[env.CONTROL], rank=0, restart_count=0)\n"
                      "print('loading', flush=True)\ntime.sleep(600)\n")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, *polling("gcp", gce), "--notice-gcp-deadline", "4", str(script)], env=ENV)
    wait_for(lambda: status(root).get("trainers"), 30, "the trainer to connect")
    gce.set_gcp("preempted", "TRUE")
    run.wait_event("stop_requested", timeout=10)
    st = status(root)
    assert st["notice"]["pending"] is True and st["notice"]["source"] == "gcp"
    text = ckptd("status", "--dir", root).stdout
    assert "PENDING: gcp preempted (stop), deadline" in text, text
    assert run.wait(20) == exitcodes.STOPPED_NO_CHECKPOINT, run.stderr()
    assert "before the trainer reached its first step" in run.stderr()
    assert not store.list_checkpoints(root)
    result = run.events("notice_result")[-1]
    assert result["committed"] is False and 0 < result["lead_seconds"] <= 4


def test_a_sigterm_and_a_second_notice_after_the_first_make_one_emergency_checkpoint_then_slurm_requeues(
        tmp_path, fake):
    imds = fake("aws")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    stub = bin_dir / "scontrol"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    stub.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"}
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, *polling("aws", imds), "--notice-rebalance", "stop", "--slurm-requeue",
                               "--every-steps", "1", TRAINER, "--steps", "1000", "--step-time", "2"], env=env)
    assert run.wait_event("start")["slurm"] == {"job_id": "4242", "restart_count": 2}
    run.wait_event("checkpoint", timeout=30)
    announce("aws", imds, 100)
    run.wait_event("stop_requested", timeout=10)
    run.signal(signal.SIGTERM)  # the platform's own SIGTERM after its notice: the same preemption
    imds.set(rebalance={"noticeTime": iso(time.time())})  # and a second notice
    wait_for(lambda: len(run.events("notice")) >= 3, 10, "the SIGTERM and the second notice")
    assert run.wait(30) == exitcodes.PREEMPTED, run.stderr()
    assert [e["kind"] for e in run.events("checkpoint")].count("emergency") == 1
    assert not run.events("stop_forced") and len(run.events("stop_requested")) == 1
    assert "one emergency checkpoint, not two" in run.stderr()
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    assert run.events("slurm_requeue")[-1]["exit_code"] == 0


def test_a_rebalance_checkpoints_then_is_withdrawn_and_training_goes_on(tmp_path, fake):
    imds = fake("aws")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, *polling("aws", imds), "--notice-rebalance", "checkpoint",
                               TRAINER, "--steps", "150", "--step-time", "0.03"], env=ENV)
    wait_for(lambda: status(root).get("trainers"), 30, "the trainer to connect")
    imds.set(rebalance={"noticeTime": iso(time.time())})
    saved = run.wait_event("checkpoint", timeout=10)
    assert saved["kind"] == "manual"
    imds.set(rebalance=None)
    run.wait_event("notice_withdrawn", timeout=10)
    assert run.wait(30) == 0, run.stderr()
    assert "final_step=150" in run.stdout()
    assert re.search(r"save request at step \d+: waited=True", run.stdout())  # at full speed
    assert not run.events("stop_requested") and not run.events("notice_result")


def test_bad_answers_from_the_service_are_logged_once_each_never_stop_training_and_back_off(tmp_path, fake):
    imds = fake("aws")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, *polling("aws", imds), TRAINER, "--steps", "100000", "--step-time", "0.02"],
              env=ENV)
    wait_for(lambda: imds.count("instance-action") >= 5, 30, "healthy polls")
    phases = [({"mode": "500"}, "HTTP 500"), ({"mode": "401"}, "HTTP 401"), ({"mode": "garbage"}, "not JSON"),
              ({"mode": None, "instance_action": {"action": "terminate", "time": iso(time.time() - 7200)}}, "past"),
              ({"instance_action": {"action": "terminate", "time": iso(time.time() + 86400)}}, "ahead"),
              ({"mode": "hang"}, "no answer")]
    for change, words in phases:
        imds.set(**change)
        wait_for(lambda words=words: words in run.stderr(), 15, f"the log line for {words}")
        if change.get("mode") == "hang":
            break
        seen = len(imds.requests)
        wait_for(lambda seen=seen: len(imds.requests) >= seen + 2, 15, "more polls")  # each logged once, not per poll
        if change.get("mode") == "500":  # healthy: 2 requests per 0.1 s poll; failing: backing off to 1.6 s
            seen, t0 = len(imds.requests), time.monotonic()
            wait_for(lambda t0=t0: time.monotonic() - t0 > 2.0, 5, "2 s")
            assert len(imds.requests) - seen <= 8, len(imds.requests) - seen
    imds.set(mode=None, instance_action=None)
    imds.release()
    assert run.proc.poll() is None and not run.events("stop_requested")
    err = run.stderr()
    for _, words in phases:
        assert err.count(words) == 1, (words, err)
    assert "unexpected error" not in err
    announce("aws", imds, 60)  # the poller survived all of it
    assert run.wait(30) == exitcodes.PREEMPTED, run.stderr()
