"""ck.poll(): a safe point outside training steps (validation, data setup) keeps the run responsive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ckptd import exitcodes, store
from fixtures.sup_helpers import FAST, FIXTURES, Run, ckptd, wait_for

SCRIPT = os.path.join(FIXTURES, "validating_trainer.py")


def test_a_long_validation_that_polls_is_not_a_hang_and_a_stop_there_checkpoints_the_last_step(tmp_path):
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--grace", "60", "--hang-timeout", "3", SCRIPT])
    wait_for(lambda: "validating after step 5" in run.stdout(), 60, "the validation phase")
    t0 = time.monotonic()
    # idle in validation well past the hang timeout (3 s) and the hello timeout (10 s): no hang declared
    wait_for(lambda: time.monotonic() - t0 > 11 and ckptd("status", "--dir", root).returncode == 0, 30,
             "11 s of validation")
    assert not run.events("hang"), run.stderr()
    stop = ckptd("stop", "--wait", "--dir", root, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert run.wait(30) == exitcodes.PREEMPTED, run.stderr()
    latest = store.latest_valid(root)
    assert latest is not None and latest.step == 5 and latest.kind == "emergency"


def test_sigterm_during_validation_without_a_supervisor_exits_85_with_the_emergency_checkpoint(tmp_path):
    root = str(tmp_path / "ck")
    proc = subprocess.Popen([sys.executable, SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CKPTD_DIR": root})
    assert "validating after step 5" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == exitcodes.PREEMPTED
    latest = store.latest_valid(root)
    assert latest is not None and latest.step == 5 and latest.kind == "emergency"
