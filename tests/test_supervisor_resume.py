"""What `ckptd run` starts: the run in DIR resumed, a new run, or nothing (resume.py), and what it says.

The decisions are tested in-process on real checkpoint manifests' origins; real `ckptd run`s of the bundled
example prove the README's commands in order, --fresh and --resume-from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ckptd import exitcodes, origin, store
from ckptd.supervisor import resume
from ckptd.supervisor.resume import Action, StartRefused
from fixtures.sup_helpers import Run, toy_digest, toy_reference

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_toy.py")


class Info:
    """The fields of store.CheckpointInfo that resume.plan reads."""

    def __init__(self, step: int, command: list[str], *, finished: bool = False, kind: str = "periodic",
                 config: dict | None = None, resume_from: str | None = None) -> None:
        self.step, self.kind, self.finished = step, kind, finished
        self.name = store.checkpoint_name(step)
        self.origin = origin.current(command, config, 1, resume_from)


def now(*command: str, config: dict | None = None, resume_from: str | None = None) -> dict:
    return origin.current(list(command), config, 1, resume_from)


def test_a_finished_run_and_the_same_command_is_nothing_to_do():
    p = resume.plan("ck", Info(300, [TOY, "--steps", "300"], finished=True), now(TOY, "--steps", "300"))
    assert p.action is Action.FINISHED and "finished at step 300" in p.line and "nothing to do" in p.line


def test_a_finished_run_and_another_command_is_refused_naming_what_differs_and_the_ways_on():
    with pytest.raises(StartRefused) as e:
        resume.plan("ck", Info(300, [TOY, "--steps", "300"], finished=True), now(TOY, "--steps", "3000"))
    assert e.value.exit_code == exitcodes.USAGE
    msg = str(e.value)
    assert "--steps 300' -> " in msg and "--steps 3000'" in msg
    assert "--fresh" in msg and "--resume-from ck/latest" in msg and "another --dir" in msg


def test_an_edited_script_is_another_command(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print(1)\n")
    old = Info(10, [str(script)], finished=True)
    script.write_text("print(2)\n")
    with pytest.raises(StartRefused, match="script .*train.py changed since"):
        resume.plan("ck", old, now(str(script)))


def test_an_unfinished_run_resumes_and_the_line_says_what_differs():
    cfg = {"grace": 25.0, "keep_last": None}
    p = resume.plan("ck", Info(150, [TOY, "--steps", "300"], kind="emergency", config=cfg),
                    now(TOY, "--steps", "300", "--step-delay", "0.02", config={**cfg, "keep_last": 3}))
    assert p.action is Action.RESUME
    assert p.line.startswith("resuming the run in ck at step 150 (emergency, step-000000000150)")
    assert "--step-delay 0.02'" in p.line and "config keep_last null -> 3" in p.line
    same = resume.plan("ck", Info(150, [TOY]), now(TOY))
    assert same.action is Action.RESUME and "differs" not in same.line


def test_fresh_moves_a_finished_or_other_run_aside_and_refuses_the_ambiguous_cases():
    assert resume.plan("ck", None, now(TOY), fresh=True).action is Action.NEW
    assert resume.plan("ck", Info(300, [TOY], finished=True), now(TOY), fresh=True).action is Action.FRESH
    assert resume.plan("ck", Info(30, [TOY, "--lr", "1"]), now(TOY), fresh=True).action is Action.FRESH
    with pytest.raises(StartRefused, match="unfinished run of this same command"):  # a replayed --fresh
        resume.plan("ck", Info(30, [TOY]), now(TOY), fresh=True)
    with pytest.raises(StartRefused, match="multi-node"):
        resume.plan("ck", Info(300, [TOY], finished=True), now(TOY), fresh=True, multi_node=True)
    with pytest.raises(StartRefused, match="process 42 is writing"):
        resume.plan("ck", Info(300, [TOY], finished=True), now(TOY), fresh=True,
                    writer_busy="process 42 is writing a checkpoint into ck")


def test_resume_from_branches_into_an_empty_dir_and_resumes_its_own_checkpoints_after():
    src = "/runs/a/step-000000000300"
    assert resume.plan("ck", None, now(TOY, resume_from=src), resume_from=src).action is Action.NEW
    own = Info(350, [TOY], resume_from=src)
    assert resume.plan("ck", own, now(TOY, resume_from=src), resume_from=src).action is Action.RESUME
    with pytest.raises(StartRefused, match="already holds another run"):
        resume.plan("ck", Info(350, [TOY]), now(TOY, resume_from=src), resume_from=src)


# --------------------------------------------------------------------------- real runs


def ckptd_run(tmp_path, root: str, *args: str, name: str) -> Run:
    return Run(tmp_path, root, list(args), name=name)


@pytest.mark.kind("system")
def test_readme_order_finished_run_same_command_noop_other_command_refused_fresh_is_a_new_run(tmp_path):
    root = str(tmp_path / "checkpoints")
    first = ckptd_run(tmp_path, root, TOY, "--steps", "100", name="first")
    assert first.wait(120) == 0, first.stderr()
    finished = store.latest_valid(root)
    assert finished.finished and finished.step == 100
    assert finished.origin["command"] == [TOY, "--steps", "100"]
    assert finished.origin["script_sha256"] == origin.script_sha256(TOY)

    again = ckptd_run(tmp_path, root, TOY, "--steps", "100", name="again")
    assert again.wait(60) == 0, again.stderr()
    assert again.stdout() == ""  # no trainer started: nothing trained
    assert "finished at step 100" in again.stderr() and "nothing to do" in again.stderr()

    longer = ckptd_run(tmp_path, root, TOY, "--steps", "200", name="longer")
    assert longer.wait(60) == exitcodes.USAGE, longer.stderr()
    assert longer.stdout() == ""
    assert re.search(r"--steps 100' -> '.*--steps 200'", longer.stderr()), longer.stderr()
    assert [i.step for i in store.list_checkpoints(root)][-1] == 100  # untouched

    fresh = ckptd_run(tmp_path, root, "--fresh", TOY, "--steps", "200", name="fresh")
    assert fresh.wait(120) == 0, fresh.stderr()
    assert "start_step=0" in fresh.stdout()
    # T_max of the new schedule is 200: the result is a fresh 200-step run's, not the 100-step run's resumed
    assert toy_digest(fresh.stdout(), 200) == toy_reference(str(tmp_path / "ref"), 200)
    (moved,) = os.listdir(os.path.join(root, store.PREVIOUS_DIR))
    kept = os.listdir(os.path.join(root, store.PREVIOUS_DIR, moved))
    assert store.checkpoint_name(100) in kept  # moved aside, not deleted
    assert "moved aside to" in fresh.stderr()


@pytest.mark.kind("system")
def test_resume_from_branches_another_runs_checkpoint_and_a_rerun_of_the_branch_is_nothing_to_do(tmp_path):
    base = str(tmp_path / "base")
    assert ckptd_run(tmp_path, base, TOY, "--steps", "100", name="base").wait(120) == 0
    branch = str(tmp_path / "branch")
    args = ["--resume-from", f"{base}/latest", TOY, "--steps", "150"]
    run = ckptd_run(tmp_path, branch, *args, name="branch")
    assert run.wait(120) == 0, run.stderr()
    assert "start_step=100" in run.stdout() and "final_step=150" in run.stdout()
    assert "branched from" in run.stderr()
    newest = store.latest_valid(branch)
    assert newest.step == 150 and newest.origin["resume_from"] == os.path.join(base, store.checkpoint_name(100))
    rerun = ckptd_run(tmp_path, branch, *args, name="rerun")
    assert rerun.wait(60) == 0, rerun.stderr()
    assert rerun.stdout() == "" and "nothing to do" in rerun.stderr()


SCRIPT = """
import sys, torch, ckptd
model = torch.nn.Linear(2, 2)
ck = ckptd.Checkpointer(model=model, dir=sys.argv[1], every_steps=5, handle_signals=False)
start = ck.restore()
for s in range(start, int(sys.argv[2])):
    ck.step(s + 1)
ck.close()
"""


@pytest.mark.kind("system")
def test_restore_says_in_its_line_that_the_run_finished_and_what_differs(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    root = str(tmp_path / "ck")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}

    def train(steps: int) -> str:
        r = subprocess.run([sys.executable, str(script), root, str(steps)], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        return r.stderr.strip()

    assert train(10).startswith("ckptd: no checkpoint in")
    with open(os.path.join(root, store.checkpoint_name(10), store.MANIFEST)) as f:
        assert json.load(f)["finished"] is True
    line = train(20)
    assert line.startswith(f"ckptd: resumed from step 10: {os.path.join(root, store.checkpoint_name(10))}")
    assert "(that run had finished" in line
    assert f"differs from the run that wrote it: command '{script} {root} 10' -> '{script} {root} 20'" in line
    same = train(20)  # the same command again: resumes its own finished end, nothing differs
    assert "(that run had finished" in same and "differs" not in same


@pytest.mark.kind("system")
def test_move_aside_moves_checkpoints_and_pins_and_a_live_writer_is_seen(tmp_path, make_checkpoints):
    import socket

    root = make_checkpoints([1, 2])
    store.pin(root, store.checkpoint_name(1))
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = os.path.join(root, f".tmp-{store.checkpoint_name(3)}-{socket.gethostname()}-{writer.pid}-0123abcd")
        os.mkdir(tmp)
        assert f"process {writer.pid} is writing a checkpoint into {root}" in store.live_writer(root)
    finally:
        writer.kill()
        writer.wait()
    assert store.live_writer(root) == ""  # its writer is gone: a leftover, not a writer
    os.rmdir(tmp)
    dest, moved = store.move_aside(root, "run")
    assert moved == [store.PINS_DIR, store.checkpoint_name(1), store.checkpoint_name(2)]
    assert store.list_checkpoints(root) == [] and store.pinned(root) == set()
    assert [i.step for i in store.list_checkpoints(dest)] == [1, 2] and store.pinned(dest) == {store.checkpoint_name(1)}


def test_restore_loads_the_branch_point_only_while_the_run_has_no_checkpoint_of_its_own(tmp_path, monkeypatch,
                                                                                        make_checkpoints):
    import ckptd
    from conftest import small_model

    base = make_checkpoints([4], root=tmp_path / "base")
    monkeypatch.setenv("CKPTD_RESUME_FROM", os.path.join(base, store.checkpoint_name(4)))
    own = str(tmp_path / "own" / "not-yet")  # does not exist yet
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=own, handle_signals=False)
    assert ck.restore() == 4
    ck.step(6)
    ck.close()
    model, opt = small_model()
    assert ckptd.Checkpointer(model=model, optimizer=opt, dir=own, handle_signals=False).restore() == 6


def test_the_recorded_command_hides_secret_looking_option_values_as_the_log_does():
    recorded = origin.current([TOY, "--api-key", "S3CRET", "--hf-token=T0KEN", "--steps", "3"])
    assert recorded["command"] == [TOY, "--api-key", "***", "--hf-token=***", "--steps", "3"]
    assert "S3CRET" not in json.dumps(recorded) and "T0KEN" not in json.dumps(recorded)
