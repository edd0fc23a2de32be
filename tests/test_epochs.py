"""Exact resume for the MNIST-style loop: DataLoader(shuffle=True), test() and scheduler.step() at each epoch's end.

tests/fixtures/mnist_trainer.py is the recipe of the README applied to the pytorch/examples MNIST script (on
synthetic data). Each test stops it under `ckptd run` at a chain of points, one per life of the script
(SIGTERM: each life a new `ckptd run`; SIGKILL: the supervisor restarts it), and the last life must end
bit-identical to an uninterrupted run: the same parameters and optimizer state, the same learning rate
and scheduler epoch, and every evaluation it printed equal to the uninterrupted run's of that epoch
(evaluation run again after a resume gives the same result; none is skipped).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

import ckptd
from ckptd import exitcodes, store
from fixtures.sup_helpers import DIST_OFF, FAST, FIXTURES, TORCHRUN, Run, journal, shared, wait_for
from fixtures.sup_helpers import ckptd as ckptd_cli

pytestmark = pytest.mark.slow  # each test runs the MNIST-style script through several lives

SCRIPT = os.path.join(FIXTURES, "mnist_trainer.py")


def _plain(args: list[str], directory: str, prefix: list[str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    out = subprocess.run([*(prefix or [sys.executable]), SCRIPT, *args], capture_output=True, text=True,
                         timeout=180, env={**env, "CKPTD_DIR": directory})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    return shared("epochs", lambda: _plain([], str(tmp_path_factory.mktemp("ref") / "ck")))


def _final(text: str, rank: int = 0, log: str = "") -> str:
    # Ranks write to one pipe and their lines can run together: find the records, not the lines.
    m = re.findall(rf"final rank={rank} (step=\d+ lr=\S+ last_epoch=\d+ digest=[0-9a-f]+)", text)
    assert len(m) == 1, text + log
    return m[0]


def _evals(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for epoch, rest in re.findall(r"test epoch=(\d+) (rank=\d+ loss=[0-9.]+ correct=\d+)", text):
        out.setdefault(epoch, set()).add(rest)
    return out


def _assert_same_run(ref: str, outputs: list[str], root: str, log: str = "") -> None:
    assert _final(outputs[-1], log=log) == _final(ref), outputs[-1] + log
    want = {e: next(iter(v)) for e, v in _evals(ref).items()}
    seen: dict[str, set[str]] = {}
    for text in outputs:
        for e, v in _evals(text).items():
            seen.setdefault(e, set()).update(v)
    assert seen == {e: {v} for e, v in want.items()}, "an evaluation differs from the uninterrupted run's"
    # The newest checkpoint holds the state the run ended with (after the last epoch's scheduler.step()).
    latest = store.latest_valid(root)
    state = ckptd.load_state(latest.path)
    assert state["scheduler"]["last_epoch"] == 3 and state["progress"]["epoch_done"] is True, latest


def test_sigterm_mid_epoch_at_an_epochs_last_step_in_evaluation_and_before_scheduler_step_resume_bit_exact(
        tmp_path, reference):
    """Workers 2, no periodic saves: every life ends with an emergency checkpoint; the stop in evaluation
    waits (no safe point) until the stop-wait report is journaled, then meets ck.poll()."""
    root, go = str(tmp_path / "ck"), str(tmp_path / "go")
    faults = "term@step:12,hold@eval:2:0,term@step:24,term@sched:3,-"
    args = [SCRIPT, "--workers", "2", "--faults", faults, "--life-file", str(tmp_path / "life"), "--go-file", go]
    expect = [(12, "epoch 2, 4 of 8 batches"), (16, "evaluation of epoch 2"), (24, "last step"), (24, "epoch end")]
    outputs = []
    for i, (step, _where) in enumerate(expect):
        run = Run(tmp_path, root, [*FAST, "--grace", "60", *args], name=f"life{i}")
        if i == 1:
            ev = run.wait_event("stop_wait", timeout=60)
            assert "mnist_trainer.py:" in ev["where"] and "in test()" in ev["where"], ev
            assert run.stderr().count("calls neither ck.step() nor ck.poll()") == 1, run.stderr()
            open(go, "w").close()
        assert run.wait(90) == exitcodes.PREEMPTED, run.stderr()
        outputs.append(run.stdout())
        newest = store.latest_valid(root)
        assert newest.step == step, (i, newest)
        if i < 3:
            assert newest.kind == "emergency", (i, newest)
        if i == 3:  # the stop came in the end-of-epoch work: its checkpoint replaced step 24's and holds that work
            state = ckptd.load_state(newest.path)
            assert newest.kind == "emergency" and state["progress"]["epoch_done"] is True, (newest, state["progress"])
            assert state["scheduler"]["last_epoch"] == 3, state["scheduler"]
    waited = [e for e in journal(root, "stop_wait") if e.get("reached")]
    assert len(waited) == 1 and waited[0]["seconds"] >= 3.0, journal(root, "stop_wait")
    last = Run(tmp_path, root, [*FAST, *args], name="last")
    assert last.wait(90) == 0, last.stderr()
    outputs.append(last.stdout())
    assert "start_step=24" in last.stdout() and "test epoch=" not in last.stdout(), last.stdout()
    _assert_same_run(reference, outputs, root, log=last.stderr())
    newest = store.latest_valid(root)  # nothing changed after the epoch-end checkpoint: close() only marks it
    assert newest.step == 24 and newest.kind == "emergency" and newest.finished, newest


def test_sigkill_mid_epoch_in_evaluation_and_at_the_last_step_with_saves_every_epoch_resume_bit_exact(
        tmp_path, reference):
    """Workers 0, a periodic save every 8 steps = the epoch's length: each is taken at the epoch's end."""
    root = str(tmp_path / "ck")
    faults = "kill@step:12,kill@eval:2:1,kill@step:24,-"
    run = Run(tmp_path, root, [*FAST, SCRIPT, "--every-steps", "8", "--faults", faults,
                               "--life-file", str(tmp_path / "life")])
    assert run.wait(180) == 0, run.stderr()
    out = run.stdout()
    # Lives: killed at 12, in epoch 2's evaluation, at 24, then done; each resumed from an epoch's end (how far
    # depends on whether the background save of the epoch before had committed when the kill came).
    starts = [int(s) for s in re.findall(r"^start_step=(\d+)", out, re.M)]
    assert len(starts) == 4 and all(s % 8 == 0 for s in starts), out
    assert not run.events("step_jump")
    _assert_same_run(reference, [out], root)
    # Each periodic save due at an epoch's last step was taken after that epoch's test() and scheduler.step().
    periodic = [i for i in store.list_checkpoints(root) if i.kind == "periodic"]
    assert {i.step for i in periodic} >= {8, 16}, periodic
    for info in periodic:
        state = ckptd.load_state(info.path)
        assert state["progress"]["epoch_done"] is True and state["scheduler"]["last_epoch"] == info.step // 8


def test_ddp_two_ranks_with_distributed_sampler_sigkill_in_evaluation_and_sigterm_resume_bit_exact(tmp_path):
    ref = _plain(["--ddp"], str(tmp_path / "ref"), prefix=[*TORCHRUN, "--standalone", "--nproc-per-node", "2"])
    root = str(tmp_path / "ck")
    argv = [*DIST_OFF, "--", *TORCHRUN, "--standalone", "--nproc-per-node", "2", SCRIPT, "--ddp",
            "--every-steps", "8", "--faults", "kill@eval:2:0,hold@step:12", "--life-file", str(tmp_path / "life"),
            "--go-file", str(tmp_path / "go")]
    run = Run(tmp_path, root, argv)
    # Rank 1 dies in epoch 2's evaluation (step 16's save waits for the epoch's end); the job restarts, and
    # in its second life rank 1 holds at step 12 while the test stops the run.
    wait_for(lambda: "fault hold at step:12" in run.stdout(), 300, "the second life at step 12")
    run.signal(signal.SIGTERM)
    run.wait_event("notice", timeout=30)
    open(tmp_path / "go", "w").close()
    assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()
    stopped = journal(root, "checkpoint")[-1]
    assert stopped["kind"] == "emergency" and stopped["step"] >= 12
    again = Run(tmp_path, root, argv[:-6], name="again")
    assert again.wait(150) == 0, again.stderr()
    out = run.stdout() + again.stdout()
    for rank in (0, 1):
        assert _final(again.stdout(), rank) == _final(ref, rank)
        want = {e: v for e, v in _evals(ref).items()}
        got = {e: {x for x in v if f"rank={rank}" in x} for e, v in _evals(out).items()}
        assert got == {e: {x for x in v if f"rank={rank}" in x} for e, v in want.items()}


def _status_step(root: str) -> int:
    import json

    r = ckptd_cli("status", "--dir", root, "--json")
    return (json.loads(r.stdout).get("step") or 0) if r.returncode == 0 else 0
