"""The Hugging Face Trainer with ckptd (ckptd.integrations.transformers), under `ckptd run`, with the real library.

tests/fixtures/hf_trainer.py: a 2-layer GPT-2 from a config (random weights, dropout), AdamW with a linear schedule,
a loss logged every 4 steps, an evaluation at each epoch's end that draws from the global RNG; stopped at chosen
points, one per life. Every stopped and resumed run must end bit-identical to an uninterrupted one: the same
parameters and optimizer state, step, epoch and learning rate, and every logged loss and evaluation loss equal to the
uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import ckptd
from ckptd import exitcodes, store
from fixtures.sup_helpers import (
    DIST_OFF,
    FAST,
    FIXTURES,
    TORCHRUN,
    Run,
    ddp_sigterm_at_a_hold,
    plain_run,
    save_wait_at_a_hold_then_sigkill,
    shared,
    skip_without,
)

skip_without("transformers")  # by name only: nothing above imports it

pytestmark = pytest.mark.slow  # a dozen trainer processes, each importing transformers

SCRIPT = os.path.join(FIXTURES, "hf_trainer.py")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[str, str]:
    """An uninterrupted, unsupervised run (its dir: a checkpoint every 4 steps, the best by eval_loss kept), one
    per session (sup_helpers.shared)."""
    def make() -> tuple[str, str]:
        tmp = tmp_path_factory.mktemp("ref")
        return plain_run([SCRIPT, "--dir", str(tmp / "ck"), "--out", str(tmp / "out"), "--every-steps", "4",
                          "--top-k", "1"], ENV), str(tmp / "ck")

    return tuple(shared("hf", make))


@pytest.fixture(scope="module")
def reference(reference_run) -> str:
    return reference_run[0]


def _final(text: str) -> str:
    m = re.findall(r"^final (step=\d+ epoch=\S+ lr=\S+ digest=[0-9a-f]+)$", text, re.M)
    assert len(m) == 1, text
    return m[0]


def _logged(text: str) -> dict[tuple[str, str], set[str]]:
    seen: dict[tuple[str, str], set[str]] = {}
    for kind, step, loss in re.findall(r"^(log|eval) step=(\d+) loss=(\S+)$", text, re.M):
        seen.setdefault((kind, step), set()).add(loss)
    return seen


def _assert_same_run(ref: str, outputs: list[str]) -> None:
    assert _final(outputs[-1]) == _final(ref), outputs[-1]
    want = _logged(ref)
    assert {k for k, _ in want} == {"log", "eval"} and len(want) == 7, ref
    seen: dict[tuple[str, str], set[str]] = {}
    for text in outputs:
        for key, values in _logged(text).items():
            seen.setdefault(key, set()).update(values)
    assert seen == want, "a logged or evaluation loss differs from the uninterrupted run's, or is missing"


def _plain(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The fixture run without the supervisor."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    return subprocess.run([sys.executable, SCRIPT, *args, "--life-file", str(tmp_path / "life")], capture_output=True,
                          text=True, timeout=300, env={**env, **ENV})


def _args(tmp_path, *extra: str) -> list[str]:
    return [*FAST, "--grace", "60", SCRIPT, "--out", str(tmp_path / "out"), "--life-file", str(tmp_path / "life"),
            *extra]


def test_sigterm_mid_epoch_and_at_an_epochs_last_step_resumes_bit_identical(tmp_path, reference):
    """Each life a new `ckptd run`, stopped by SIGTERM (to the supervisor and the trainer, as a scheduler does):
    at step 3 (mid-epoch, between two logged losses: the loss summed since the last log is in the checkpoint), then
    at step 12, an epoch's last step: its safe point is after that epoch's evaluation, which the resumed run must
    not run again nor skip."""
    root = str(tmp_path / "ck")
    args = _args(tmp_path, "--faults", "term@step:3,term@step:12,-")
    outputs = []
    for i, step in enumerate([3, 12]):
        run = Run(tmp_path, root, args, env=ENV, name=f"life{i}")
        assert run.wait(180) == exitcodes.PREEMPTED, run.stderr()
        outputs.append(run.stdout())
        newest = store.latest_valid(root)
        assert (newest.step, newest.kind) == (step, "emergency"), (i, newest, run.stderr())
        assert f"start step={[0, 3][i]}" in run.stdout(), run.stdout()
    # the logged metrics reach the manifest; the evaluation at step 12 ran before its safe point, so its checkpoint
    # carries it
    evaluated = dict(re.findall(r"^eval step=(\d+) loss=(\S+)$", reference, re.M))
    assert newest.metrics["eval_loss"] == float(evaluated["12"]) and "loss" in newest.metrics, newest.metrics
    last = Run(tmp_path, root, args, env=ENV, name="last")
    assert last.wait(180) == 0, last.stderr()
    outputs.append(last.stdout())
    assert "start step=12" in last.stdout(), last.stdout()
    _assert_same_run(reference, outputs)
    newest = store.latest_valid(root)
    assert newest.step == 18 and newest.finished, newest
    state = ckptd.load_state(newest.path, tensors=False)
    assert state["extra"]["transformers"]["stateful"]["trainer_state"]["global_step"] == 18


def test_save_wait_then_sigkill_restarts_from_that_checkpoint_bit_identical(tmp_path, reference):
    """One `ckptd run`, no periodic saves: `ckptd save --wait` while the trainer is at step 7 answers once the
    manual checkpoint of step 7 is committed; a SIGKILL at step 9 (after that answer) is restarted from it and ends
    identical."""
    root, go = str(tmp_path / "ck"), str(tmp_path / "go")
    run = Run(tmp_path, root, [*FAST, *_args(tmp_path, "--faults", "hold@step:7+waitkill@step:9,-", "--go-file", go)],
              env=ENV)
    out = save_wait_at_a_hold_then_sigkill(run, root, go)
    _assert_same_run(reference, [out])


def test_a_hung_trainer_is_replaced_and_resumes_from_the_latest_checkpoint_bit_identical(tmp_path, reference):
    """The safe points' heartbeats (and the evaluation's) keep `--hang-timeout` quiet while the Trainer runs; a
    Trainer stuck at step 9 (no safe point) is killed and restarted from the newest checkpoint committed by then."""
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, ["--hang-timeout", "8", "--hang-grace", "1", "--backoff-base", "0.05", "--backoff-max",
                               "0.1", *_args(tmp_path, "--every-steps", "2", "--faults", "hang@step:9,-")], env=ENV)
    assert run.wait(300) == 0, run.stderr()
    [restart] = run.events("restart")
    assert restart["reason"] == "hang", run.events()
    committed = [e["step"] for e in run.events("checkpoint") if e["time"] <= restart["time"]]
    assert committed and restart["resume_step"] == max(committed) <= 9, (committed, restart)
    out = run.stdout()
    assert re.findall(r"^start step=(\d+)", out, re.M) == ["0", str(max(committed))], out
    _assert_same_run(reference, [out])


def test_a_corrupt_newest_checkpoint_is_quarantined_and_the_run_resumes_from_the_one_before(tmp_path, reference):
    """Plain runs (no supervisor): a checkpoint every 4 steps (durable before the step returns), SIGKILL at step
    10; a flipped byte in the tensors of step 8 sets it aside, the rerun resumes from step 4 and ends identical."""
    root = str(tmp_path / "ck")
    first = _plain(tmp_path, "--dir", root, "--out", str(tmp_path / "out"), "--every-steps", "4", "--sync-save",
                   "--faults", "kill@step:10,-")
    assert first.returncode == -9, first.stderr
    newest = store.latest_valid(root)
    assert newest.step == 8, newest
    with open(os.path.join(newest.path, store.TENSORS), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = _plain(tmp_path, "--dir", root, "--out", str(tmp_path / "out"), "--every-steps", "4", "--sync-save",
                    "--faults", "kill@step:10,-")
    assert second.returncode == 0, second.stderr
    assert "start step=4" in second.stdout, second.stdout
    assert os.listdir(os.path.join(root, ".quarantine")), "the corrupt checkpoint was not set aside"
    _assert_same_run(reference, [first.stdout, second.stdout])


def test_resume_from_a_trainer_checkpoint_while_ckptd_has_none_then_refused(tmp_path):
    """train(resume_from_checkpoint=<checkpoint-N of the Trainer's own>) is the Trainer's own load while ckptd's
    directory is empty (the run continues from step 6 and ckptd checkpoints it); once ckptd has checkpoints, the
    same call is refused with a message instead of silently choosing one of the two."""
    out, root = str(tmp_path / "native"), str(tmp_path / "ck")
    native = _plain(tmp_path, "--native", "--dir", root, "--out", out, "--every-steps", "6", "--faults",
                    "kill@step:8,-")
    assert native.returncode == -9, native.stderr
    path = os.path.join(out, "checkpoint-6")
    assert os.path.isdir(path), os.listdir(out)
    branched = _plain(tmp_path, "--dir", root, "--out", str(tmp_path / "out"), "--resume-from", path,
                      "--every-steps", "4", "--sync-save", "--faults=-,kill@step:9")
    assert branched.returncode == -9, branched.stderr
    assert "start step=6" in branched.stdout, branched.stdout
    assert store.latest_valid(root).step == 8
    refused = _plain(tmp_path, "--dir", root, "--out", str(tmp_path / "out"), "--resume-from", path)
    assert refused.returncode == 1, refused.stderr
    assert "resume_from_checkpoint" in refused.stderr and "step 8" in refused.stderr, refused.stderr


def test_ddp_two_ranks_sigterm_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path):
    """torchrun, 2 ranks (gloo on CPU), each a Trainer under DDP (3 steps per epoch): `ckptd run` gets SIGTERM while
    both ranks hold at step 4; both write the emergency checkpoint of one step, `ckptd run` exits 85, and the same
    command resumes both ranks to the uninterrupted 2-rank run's end, bit-identical on each rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    ref = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", SCRIPT, "--dir", str(tmp_path / "ref"),
                          "--out", str(tmp_path / "ref-out")], capture_output=True, text=True, timeout=300,
                         env={**env, **ENV})
    assert ref.returncode == 0, ref.stderr
    root, go = str(tmp_path / "ck"), str(tmp_path / "go")
    argv = [*DIST_OFF, "--grace", "60", "--", *TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts",
            "2", SCRIPT, "--out", str(tmp_path / "out"), "--life-file", str(tmp_path / "life"), "--go-file", go,
            "--faults", "hold@step:4,-"]
    _, newest = ddp_sigterm_at_a_hold(tmp_path, root, argv, go, ENV)
    again = Run(tmp_path, root, argv, env=ENV, name="again")
    assert again.wait(240) == 0, again.stderr()
    out = again.stdout()
    assert re.findall(r"start step=(\d+)", out) == [str(newest.step)] * 2, out
    finals = re.findall(r"final (step=\d+ epoch=\S+ lr=\S+ digest=[0-9a-f]+)", out)
    assert len(finals) == 2 and set(finals) == set(re.findall(r"final (step=\d+ epoch=\S+ lr=\S+ digest=[0-9a-f]+)",
                                                               ref.stdout)), (out, ref.stdout)


def test_top_k_by_eval_loss_is_keep_best_and_each_evaluation_gets_a_checkpoint(reference_run):
    """CkptdCallback(monitor="eval_loss", save_top_k=1) with a checkpoint every 4 steps: each evaluation's eval_loss
    is in the checkpoint of its step; retention keeps the best of them and the newest, deletes the rest."""
    ref, directory = reference_run
    evaluated = {int(s): float(v) for s, v in re.findall(r"^eval step=(\d+) loss=(\S+)$", ref, re.M)}
    assert sorted(evaluated) == [6, 12, 18], ref
    infos = {i.step: i for i in store.list_checkpoints(directory)}
    best = min(evaluated, key=evaluated.get)
    assert set(infos) == {best, 18}, sorted(infos)  # steps 4, 8, ... without eval_loss, and the worse ones: deleted
    for step in (best, 18):
        assert infos[step].metrics["eval_loss"] == evaluated[step], infos[step].metrics
        assert "loss" in infos[step].metrics
