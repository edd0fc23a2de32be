"""ckptd@.service under a REAL systemd: a user manager in a private mount namespace (fixtures/systemd_user.py).

The unit is installed by `ckptd install-unit --user` (the template with what a user manager forces: no
DynamicUser=, WantedBy=default.target; ProtectHome=read-only where Python lives under /root or /home).
A drop-in per test adds what this machine lacks (no journald: output to a file) and short timeouts.
Skipped, with the reason, without root, cgroup write access or systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from ckptd import exitcodes, store
from fixtures.sup_helpers import TRAINER, ckptd, hold, journal, running, wait_for
from fixtures.systemd_user import UserManager, skip_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "train_toy.py")
UNIT = "ckptd@job.service"

_why = skip_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no real systemd here: {_why}")


@pytest.fixture
def manager():
    # Not under /tmp: the unit's PrivateTmp=yes would hide the config and state from the service.
    base = tempfile.mkdtemp(prefix="ckptd-systemd-test-", dir="/var/lib")
    m = UserManager(base)
    try:
        m.start()
        yield m
    finally:
        try:
            m.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def install(m: UserManager, config: str, command: list[str], **service: str) -> str:
    """`ckptd install-unit --user`, plus a test drop-in; returns the job's checkpoint directory."""
    cfg = os.path.join(m.base, "job.yaml")
    with open(cfg, "w") as f:
        f.write(config)
    r = subprocess.run([sys.executable, "-m", "ckptd", "install-unit", "job", "--config", cfg, "--user", *command],
                       env=m.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out, err = os.path.join(m.base, "out.log"), os.path.join(m.base, "err.log")  # no journald here
    lines = ["[Service]", f"StandardOutput=append:{out}", f"StandardError=append:{err}", "RestartSec=100ms",
             *(f"{k}={v}" for k, v in service.items())]
    dropin = os.path.join(m.unit_dir, f"{UNIT}.d")
    os.makedirs(dropin, exist_ok=True)
    with open(os.path.join(dropin, "90-test.conf"), "w") as f:
        f.write("\n".join(lines) + "\n")
    m.systemctl("daemon-reload")
    return os.path.join(m.show(UNIT, "WorkingDirectory")["WorkingDirectory"], "checkpoints")


def output(m: UserManager, name: str = "out.log") -> str:
    try:
        with open(os.path.join(m.base, name), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def start_steps(m: UserManager) -> list[int]:
    """The step each start of the trainer resumed at (train_toy.py and the fixture print start_step=N)."""
    return [int(line.split("=")[1].split()[0]) for line in output(m).splitlines() if line.startswith("start_step=")]


def status(root: str) -> dict:
    r = ckptd("status", "--dir", root, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def trainer_pid(root: str, other_than: int | None = None) -> int:
    def find():
        pid = status(root).get("child_pid")
        return pid if pid and pid != other_than and status(root).get("trainers") else None

    return wait_for(find, 30, "a connected trainer")


def show(m: UserManager) -> dict[str, str]:
    return m.show(UNIT, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts", "MainPID", "StatusText")


def test_start_waits_for_ready_status_is_shown_stop_checkpoints_and_start_resumes(manager):
    root = install(manager, "grace: 20\n", [TOY, "--steps", "100000", "--step-delay", "0.01", "--every-steps", "1000"])
    manager.systemctl("start", UNIT)
    after_start = show(manager)
    # Type=notify: `start` returned only after READY=1, which ckptd sends once the child runs.
    assert after_start["ActiveState"] == "active" and after_start["SubState"] == "running", after_start
    assert journal(root, "spawn"), "start returned before the child was spawned"
    assert after_start["MainPID"] == str(status(root)["supervisor_pid"])
    wait_for(lambda: "training; step " in show(manager)["StatusText"], 60, "a STATUS line with the step")
    text = manager.systemctl("status", UNIT, check=False).stdout
    assert 'Status: "training; step ' in text and "restarts" in text, text

    manager.systemctl("stop", UNIT)  # SIGTERM to ckptd -> emergency checkpoint -> exit 85
    stopped = show(manager)
    assert (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"]) == \
        ("inactive", "success", str(exitcodes.PREEMPTED)), stopped  # SuccessExitStatus=85: not failed
    ck = journal(root, "checkpoint")[-1]
    assert ck["kind"] == "emergency" and store.latest_valid(root).step == ck["step"]

    manager.systemctl("start", UNIT)
    wait_for(lambda: len(start_steps(manager)) == 2, 60, "the second start")
    assert start_steps(manager) == [0, ck["step"]]
    assert wait_for(lambda: journal(root, "resumed"), 20, "the resumed event")[-1]["step"] == ck["step"]
    manager.systemctl("stop", UNIT)
    assert show(manager)["Result"] == "success"


def test_kill_9_of_the_trainer_is_restarted_by_ckptd_and_systemd_sees_no_failure(manager):
    root = install(manager, "grace: 10\nbackoff_base: 0.1\nbackoff_max: 0.2\n",
                   [TRAINER, "--steps", "1000000", "--step-time", "0.01"])
    manager.systemctl("start", UNIT)
    before = show(manager)
    victim = trainer_pid(root)
    os.kill(victim, signal.SIGKILL)
    new = trainer_pid(root, other_than=victim)
    assert journal(root, "restart")[-1]["reason"] == "signal"
    wait_for(lambda: status(root).get("step"), 20, "the new trainer's first step")
    after = show(manager)
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", after
    assert (after["ActiveState"], after["Result"]) == ("active", "success"), after
    assert running(new)
    manager.systemctl("stop", UNIT)
    assert show(manager)["Result"] == "success"


def test_stopped_trainer_is_handled_by_ckptd_before_systemds_watchdog_fires(manager):
    # hang_timeout 2 s < WatchdogSec 4 s: ckptd kills and restarts the trainer; systemd's watchdog stays fed.
    root = install(manager, "hang_timeout: 2\nhang_grace: 1\nbackoff_base: 0.1\nbackoff_max: 0.2\n",
                   [TRAINER, "--steps", "1000000", "--step-time", "0.01"], WatchdogSec="4s")
    manager.systemctl("start", UNIT)
    before = show(manager)
    victim = trainer_pid(root)
    os.kill(victim, signal.SIGSTOP)
    hang = wait_for(lambda: journal(root, "hang"), 20, "ckptd's hang event")[0]
    trainer_pid(root, other_than=victim)
    step = wait_for(lambda: status(root).get("step"), 20, "the restarted trainer's steps")
    def systemd_saw_no_failure() -> None:
        after = show(manager)
        assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", after
        assert (after["ActiveState"], after["Result"]) == ("active", "success"), after

    hold(systemd_saw_no_failure, 4.5, interval=0.5)  # longer than WatchdogSec: a starved watchdog would act
    assert status(root)["step"] > step and hang["pids"] == [victim]
    manager.systemctl("stop", UNIT)


def test_watchdog_follows_progress_when_ckptd_has_no_hang_timeout(manager):
    # The counter-test: with hang_timeout off, a stopped trainer starves the watchdog (ckptd itself is alive),
    # systemd kills ckptd (WatchdogSignal=SIGKILL) and Restart=on-failure starts it again from the checkpoint.
    root = install(manager, "every_steps: 20\n", [TRAINER, "--steps", "1000000", "--step-time", "0.01"],
                   WatchdogSec="2s")
    manager.systemctl("start", UNIT)
    first = show(manager)["MainPID"]
    victim = trainer_pid(root)
    wait_for(lambda: store.latest_valid(root) if os.path.isdir(root) else None, 20, "a checkpoint")
    os.kill(victim, signal.SIGSTOP)
    wait_for(lambda: show(manager)["NRestarts"] == "1", 20, "systemd's watchdog restart")
    wait_for(lambda: show(manager)["ActiveState"] == "active", 20, "the restarted service")
    assert show(manager)["MainPID"] != first
    wait_for(lambda: not running(victim), 10, "the stopped trainer to be gone")
    manager.systemctl("stop", UNIT)


def test_slow_emergency_checkpoint_outlives_timeout_stop_sec_through_extend_timeout(manager):
    root = install(manager, "grace: 30\n", [TRAINER, "--steps", "1000000", "--step-time", "0.01",
                                            "--emergency-save-time", "6"], TimeoutStopSec="2s")
    manager.systemctl("start", UNIT)
    trainer_pid(root)
    wait_for(lambda: status(root).get("step"), 20, "steps")
    t0 = time.monotonic()
    manager.systemctl("stop", UNIT)
    took = time.monotonic() - t0
    stopped = show(manager)
    assert (stopped["Result"], stopped["ExecMainStatus"]) == ("success", str(exitcodes.PREEMPTED)), stopped
    assert took > 4, f"the stop took {took:.1f} s: the slow save did not run past TimeoutStopSec=2s"
    latest = store.latest_valid(root)
    assert latest.kind == "emergency" and journal(root, "checkpoint")[-1]["kind"] == "emergency"


def test_enabled_unit_starts_at_boot_after_power_loss_and_resumes_from_newest_valid_checkpoint(manager):
    root = install(manager, "every_steps: 40\n", [TOY, "--steps", "100000", "--step-delay", "0.005",
                                                  "--every-steps", "40"])
    assert manager.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"  # install-unit enabled it
    manager.systemctl("start", UNIT)
    wait_for(lambda: len([c for c in store.list_checkpoints(root) if c.valid]) >= 3, 60, "three checkpoints")
    manager.power_loss()  # the VM is preempted: every process SIGKILLed, no shutdown, no emergency checkpoint
    valid = [c for c in store.list_checkpoints(root) if c.valid]
    newest, previous = valid[-1], valid[-2]
    with open(os.path.join(newest.path, "tensors.safetensors"), "r+b") as f:  # and the newest was damaged
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))

    manager.start()  # boot: default.target wants the enabled unit; nobody runs `systemctl start`
    try:
        wait_for(lambda: len(start_steps(manager)) == 2, 60, "the job to start at boot")
    except AssertionError:
        raise AssertionError(f"not started at boot: {show(manager)}\n{output(manager, 'err.log')[-3000:]}") from None
    assert start_steps(manager) == [0, previous.step]
    assert os.listdir(os.path.join(root, ".quarantine"))  # the damaged newest was moved aside, not loaded
    assert wait_for(lambda: journal(root, "resumed"), 20, "the resumed event")[-1]["step"] == previous.step
    manager.systemctl("stop", UNIT)
    assert show(manager)["Result"] == "success"
