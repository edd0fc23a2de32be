"""Bit-exact resume: stop after any step, resume, end equal to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import train_toy
from conftest import ROOT

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

TOTAL = 150  # 64 batches per epoch: crosses two epoch boundaries


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, opt, _ = train_toy.train(TOTAL, dir=str(tmp_path_factory.mktemp("full")), every_steps=None)
    return model.state_dict(), opt.state_dict()


def _assert_equal_state(a_model, a_opt, b_model, b_opt):
    assert a_model.keys() == b_model.keys()
    for k in a_model:
        assert torch.equal(a_model[k], b_model[k]), f"model tensor {k} differs"
    assert a_opt["state"].keys() == b_opt["state"].keys()
    for pid, st in a_opt["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b_opt["state"][pid][name]), f"optimizer state {pid}/{name} differs"
    assert a_opt["param_groups"] == b_opt["param_groups"]


@pytest.mark.parametrize("stop_after", [1, 37, 64, 65, 100, 149])
def test_stop_and_resume_is_bit_exact(tmp_path, uninterrupted, stop_after):
    d = str(tmp_path / "ck")
    train_toy.train(TOTAL, dir=d, every_steps=None, stop_after=stop_after)  # final checkpoint at stop_after
    model, opt, ck = train_toy.train(TOTAL, dir=d, every_steps=None)
    assert ck.resumed_from == f"step-{stop_after:012d}"
    _assert_equal_state(model.state_dict(), opt.state_dict(), *uninterrupted)


def test_twice_interrupted_with_periodic_saves_is_bit_exact(tmp_path, uninterrupted):
    d = str(tmp_path / "ck")
    train_toy.train(TOTAL, dir=d, every_steps=7, stop_after=30)
    train_toy.train(TOTAL, dir=d, every_steps=7, stop_after=90)
    model, opt, _ = train_toy.train(TOTAL, dir=d, every_steps=7)
    _assert_equal_state(model.state_dict(), opt.state_dict(), *uninterrupted)


@pytest.mark.slow
@pytest.mark.kind("system")
def test_sigterm_to_plain_script_writes_emergency_checkpoint_and_resume_is_exact(tmp_path):
    """Without a supervisor: SIGTERM -> emergency checkpoint at the next step, exit 85, exact resume."""
    import signal

    d = str(tmp_path / "ck")
    script = os.path.join(ROOT, "examples", "train_toy.py")
    ref = subprocess.run([sys.executable, script, "--steps", "120", "--dir", str(tmp_path / "ref"),
                          "--every-steps", "1000"],
                         capture_output=True, text=True, check=True).stdout
    # Slow steps: the SIGTERM must land before step 120 however long this test takes to send it after the
    # first line (it ends the run at the next step, so the delay costs one step)
    env = dict(os.environ, TOY_STEP_DELAY="0.25")
    p = subprocess.Popen([sys.executable, script, "--steps", "120", "--dir", d, "--every-steps", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline() == "start_step=0\n"  # the Checkpointer is up: training has begun
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 85, err
    import ckptd
    (info,) = ckptd.list_checkpoints(d)
    assert info.kind == "emergency" and 0 < info.step < 120
    r = subprocess.run([sys.executable, script, "--steps", "120", "--dir", d, "--every-steps", "1000"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[0] == f"start_step={info.step}"  # zero lost steps
    assert r.stdout.splitlines()[1:] == ref.splitlines()[1:]  # same final step and digest
