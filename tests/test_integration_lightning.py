"""PyTorch Lightning with ckptd's callback (ckptd.integrations.lightning), under `ckptd run`, with the real library.

tests/fixtures/lightning_trainer.py: a small LightningModule (dropout, AdamW, an epoch StepLR, a validation that
draws from the global RNG) on a shuffling ckptd.DataLoader, stopped at chosen points, one per life. Every
stopped and resumed run must end bit-identical to an uninterrupted one: the same parameters and optimizer state,
learning rate, step and epoch, and every validation loss it printed equal to the uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import ckptd
from ckptd import exitcodes, store
from fixtures.sup_helpers import FAST, FIXTURES, Run, save_wait_at_a_hold_then_sigkill

SCRIPT = os.path.join(FIXTURES, "lightning_trainer.py")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, str]:
    """An uninterrupted, unsupervised run (its dir keeps a checkpoint every 2 steps, the best by val_loss kept)."""
    directory = str(tmp_path_factory.mktemp("ref") / "ck")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    out = subprocess.run([sys.executable, SCRIPT, "--dir", directory, "--every-steps", "2", "--top-k", "1"],
                         capture_output=True, text=True, timeout=300, env={**env, **ENV})
    assert out.returncode == 0, out.stderr
    return out.stdout, directory


def _final(text: str) -> str:
    m = re.findall(r"^final (step=\d+ epoch=\d+ lr=\S+ digest=[0-9a-f]+)$", text, re.M)
    assert len(m) == 1, text
    return m[0]


def _assert_same_run(ref: str, outputs: list[str]) -> None:
    assert _final(outputs[-1]) == _final(ref), outputs[-1]
    want = dict(re.findall(r"^val epoch=(\d+) (step=\d+ loss=\S+)$", ref, re.M))
    assert set(want) == {"0", "1", "2"}, ref
    seen: dict[str, set[str]] = {}
    for text in outputs:
        for epoch, rest in re.findall(r"^val epoch=(\d+) (step=\d+ loss=\S+)$", text, re.M):
            seen.setdefault(epoch, set()).add(rest)
    assert seen == {e: {v} for e, v in want.items()}, "a validation differs from the uninterrupted run's, or is missing"


def test_sigterm_mid_epoch_at_an_epochs_last_batch_and_in_validation_resumes_bit_identical(tmp_path, reference):
    """Each life a new `ckptd run`, stopped by SIGTERM (to the supervisor and the trainer, as a scheduler does):
    mid-epoch (step 4 of 6), at epoch 1's last batch (step 12, its validation still to come: the resumed run
    must run it, though Lightning's own resume of a checkpoint of that batch skips it), then in epoch 2's
    validation (the checkpoint of step 18, resumed into that whole validation again)."""
    root, life = str(tmp_path / "ck"), str(tmp_path / "life")
    args = [*FAST, "--grace", "60", SCRIPT, "--faults", "term@step:4,term@step:12,term@val:2:1,-", "--life-file", life]
    outputs = []
    for i, step in enumerate([4, 12, 18]):
        run = Run(tmp_path, root, args, env=ENV, name=f"life{i}")
        assert run.wait(180) == exitcodes.PREEMPTED, run.stderr()
        outputs.append(run.stdout())
        newest = store.latest_valid(root)
        assert (newest.step, newest.kind) == (step, "emergency"), (i, newest, run.stderr())
        assert f"start step={[0, 4, 12][i]}" in run.stdout(), run.stdout()
    last = Run(tmp_path, root, args, env=ENV, name="last")
    assert last.wait(180) == 0, last.stderr()
    outputs.append(last.stdout())
    assert "start step=18" in last.stdout(), last.stdout()
    _assert_same_run(reference[0], outputs)
    newest = store.latest_valid(root)
    assert newest.step == 18 and newest.finished, newest
    state = ckptd.load_state(newest.path, tensors=False)
    assert state["scheduler"]["last_epoch"] == 3, state["scheduler"]


def test_save_wait_then_sigkill_restarts_from_that_checkpoint_bit_identical(tmp_path, reference):
    """One `ckptd run`, no periodic saves: `ckptd save --wait` while the trainer is at step 7 answers once the
    manual checkpoint of step 7 is committed; a SIGKILL at step 9 (after that answer) is restarted from it and ends
    identical."""
    root, go = str(tmp_path / "ck"), str(tmp_path / "go")
    run = Run(tmp_path, root, [*FAST, SCRIPT, "--faults", "hold@step:7+waitkill@step:9,-", "--life-file",
                               str(tmp_path / "life"), "--go-file", go], env=ENV)
    out = save_wait_at_a_hold_then_sigkill(run, root, go)
    _assert_same_run(reference[0], [out])


def test_top_k_by_a_monitored_metric_is_keep_best_and_metrics_reach_the_manifest(reference):
    """CkptdCallback(monitor="val_loss", save_top_k=1) with a checkpoint every 2 steps: each validation's val_loss
    is attached to that step's checkpoint; retention keeps the best of them and the newest, deletes the rest."""
    ref, directory = reference
    vals = {int(s): float(v) for s, v in re.findall(r"^val epoch=\d+ step=(\d+) loss=(\S+)$", ref, re.M)}
    infos = {i.step: i for i in store.list_checkpoints(directory)}
    best = min(vals, key=vals.get)
    assert best in infos and 18 in infos, sorted(infos)
    assert infos[best].metrics["val_loss"] == pytest.approx(vals[best], abs=1e-5), infos[best].metrics
    assert "loss" in infos[best].metrics
    assert set(infos) == {best, 18}, sorted(infos)  # steps 2, 4, ... without val_loss, and the worse ones: deleted


def test_a_hung_fit_is_replaced_and_resumes_from_the_latest_checkpoint_bit_identical(tmp_path, reference):
    """The callback's heartbeats (ck.step per batch, ck.poll per validation batch) keep `--hang-timeout` quiet
    while the fit runs; a fit stuck at step 9 (no safe point) is killed and restarted from the newest checkpoint
    committed by then (which one depends on how many of the periodic saves came due while one was in flight)."""
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, ["--hang-timeout", "8", "--hang-grace", "1", "--backoff-base", "0.05", "--backoff-max",
                               "0.1", SCRIPT, "--every-steps", "2", "--faults", "hang@step:9,-", "--life-file",
                               str(tmp_path / "life")], env=ENV)
    assert run.wait(240) == 0, run.stderr()
    [restart] = run.events("restart")
    assert restart["reason"] == "hang", run.events()
    committed = [e["step"] for e in run.events("checkpoint") if e["time"] <= restart["time"]]
    assert committed and restart["resume_step"] == max(committed) <= 9, (committed, restart)
    out = run.stdout()
    assert re.findall(r"^start step=(\d+)", out, re.M) == ["0", str(max(committed))], out
    _assert_same_run(reference[0], [out])
