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


def _nanogpt_style(root: str, stop_in_eval: tuple[int, int] | None = None) -> dict:
    """nanoGPT's loop shape: evaluation at the top of every 3rd iteration draws its batches from the global
    RNG streams (torch, NumPy, Python) and calls ck.poll(); training steps use dropout and random data."""
    import random

    import numpy as np
    import torch

    import ckptd

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root)
    step = ck.restore()
    while step < 7:
        if step % 3 == 0 and step:
            with torch.no_grad():
                for b in range(4):
                    model(torch.randn(8, 4) + float(np.random.rand()) + random.random())
                    if stop_in_eval == (step, b):
                        os.kill(os.getpid(), signal.SIGTERM)  # the handler records it; poll() takes it
                    ck.poll()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        ck.step(step)
    ck.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_stop_during_an_evaluation_that_draws_from_the_global_rng_resumes_bit_exact(tmp_path):
    import pytest
    import torch

    want = _nanogpt_style(str(tmp_path / "ref"))
    root = str(tmp_path / "ck")
    with pytest.raises(SystemExit) as stopped:
        _nanogpt_style(root, stop_in_eval=(3, 2))
    assert stopped.value.code == exitcodes.PREEMPTED
    latest = store.latest_valid(root)
    assert latest.step == 3 and latest.kind == "emergency"
    got = _nanogpt_style(root)  # evaluation of step 3 runs again from the RNG streams of step 3's end
    assert all(torch.equal(got[k], want[k]) for k in want)
