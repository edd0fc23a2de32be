"""PyTorch Lightning with ckptd's callback (ckptd.integrations.lightning), under `ckptd run`, with the real library.

tests/fixtures/lightning_trainer.py: a small LightningModule (dropout, AdamW, an epoch StepLR, a validation that
draws from the global RNG) on a shuffling ckptd.DataLoader, stopped at chosen points, one per life; in one process,
and as 2 DDP ranks under torchrun. Every stopped and resumed run must end bit-identical to an uninterrupted one: the
same parameters and optimizer state, learning rate, step and epoch, and every training and validation loss it
printed equal to the uninterrupted run's (on each rank).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

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

skip_without("lightning")  # by name only: nothing above imports it

SCRIPT = os.path.join(FIXTURES, "lightning_trainer.py")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, str]:
    """An uninterrupted, unsupervised run (its dir keeps a checkpoint every 2 steps, the best by val_loss kept),
    one per session (sup_helpers.shared)."""
    def make() -> tuple[str, str]:
        directory = str(tmp_path_factory.mktemp("ref") / "ck")
        return plain_run([SCRIPT, "--dir", directory, "--every-steps", "2", "--top-k", "1"], ENV), directory

    return tuple(shared("lightning", make))


# Records, not lines: two ranks print into one pipe (each print is one write, but nothing guarantees a line break
# between two ranks' records), so each is found wherever it starts.
FINAL = r"final (step=\d+ epoch=\d+ lr=[0-9.]+ digest=[0-9a-f]{16})(?: rank=(\d+))?"
LOSS = r"(train|val) epoch=(\d+) (?:batch|step)=(\d+) loss=([-+.0-9e]+|nan|inf)(?: rank=(\d+))?"


def _finals(text: str) -> dict[str, str]:
    """Each rank's final line (rank "0" in one process)."""
    found = re.findall(FINAL, text)
    finals = {rank or "0": line for line, rank in found}
    assert len(finals) == len(found) >= 1, text
    return finals


def _losses(text: str) -> dict[tuple[str, ...], set[str]]:
    """Every training loss (by rank, epoch, batch) and validation loss (by rank, epoch, step) a run printed."""
    seen: dict[tuple[str, ...], set[str]] = {}
    for kind, epoch, at, loss, rank in re.findall(LOSS, text):
        seen.setdefault((rank or "0", kind, epoch, at), set()).add(loss)
    return seen


def _assert_same_run(ref: str, outputs: list[str], ranks: int = 1, batches: int = 6) -> None:
    """The lives in ``outputs`` together printed the uninterrupted run's losses, each once or identically again, and
    the last one ended as it did, on each rank; ``batches``: training batches per epoch and rank."""
    want = _losses(ref)
    for rank in map(str, range(ranks)):
        assert {k[2] for k in want if k[:2] == (rank, "val")} == {"0", "1", "2"}, ref
        assert len([k for k in want if k[:2] == (rank, "train")]) == 3 * batches, ref
    assert all(len(v) == 1 for v in want.values()), ref
    seen: dict[tuple[str, ...], set[str]] = {}
    for text in outputs:
        for key, values in _losses(text).items():
            seen.setdefault(key, set()).update(values)
    assert seen == want, "a training or validation loss differs from the uninterrupted run's, or is missing"
    assert _finals(outputs[-1]) == _finals(ref) and len(_finals(ref)) == ranks, (outputs[-1], ref)


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


def test_a_ckptd_loader_takes_lightnings_distributed_sampler_and_keeps_its_position():
    """Under DDP Lightning rebuilds the train loader from its public attributes with a DistributedSampler in it (its
    own _update_dataloader, called here for ranks 0 and 1 of 2): a ckptd.DataLoader is rebuilt with its seed (not
    refused for holding a seed and a generator), the ranks share each epoch's batches without overlap, and a rebuilt
    loader given the state of one stopped mid-epoch yields the rest of that epoch."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    data = torch.utils.data.TensorDataset(torch.arange(48))

    def rank_loader(rank: int) -> ckptd.DataLoader:
        original = ckptd.DataLoader(data, batch_size=8, shuffle=True, seed=5)
        sampler = DistributedSamplerWrapper(original.sampler, num_replicas=2, rank=rank, shuffle=True, seed=7)
        loader = _update_dataloader(original, sampler, mode=RunningStage.TRAINING)
        assert isinstance(loader, ckptd.DataLoader) and loader.seed == 5
        return loader

    def epoch(loader: ckptd.DataLoader, e: int) -> list[list[int]]:
        loader.set_epoch(e)
        return [b[0].tolist() for b in loader]

    epochs = [[epoch(rank_loader(r), e) for r in (0, 1)] for e in (0, 1)]
    for ranks in epochs:
        assert all(len(batches) == 3 for batches in ranks)
        assert sorted(i for batches in ranks for b in batches for i in b) == list(range(48))
    assert epochs[0] != epochs[1], "every epoch in the same order"
    stopped = rank_loader(1)
    stopped.set_epoch(1)
    it = iter(stopped)
    next(it)
    resumed = rank_loader(1)
    resumed.load_state_dict(stopped.state_dict())
    assert [b[0].tolist() for b in resumed] == epochs[1][1][1:]


@pytest.mark.slow  # six processes importing Lightning (and three torchrun agents)
def test_ddp_two_ranks_sigterm_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path):
    """torchrun, 2 ranks (gloo on CPU), Trainer(strategy="ddp", devices=2): 3 steps per epoch, a save every 4 steps
    (so step 4 is a step where the ranks agree). `ckptd run` gets SIGTERM while both ranks hold at step 4 (mid-epoch
    1, after a validation and a scheduler step); both write their parts of the emergency checkpoint of one step,
    `ckptd run` exits 85, and the same command resumes both ranks to the uninterrupted 2-rank run's end:
    parameters, optimizer state, step, epoch, learning rate and every training and validation loss equal on each
    rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    ddp = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", SCRIPT, "--devices", "2", "--every-steps", "4"]
    ref = subprocess.run([*ddp, "--dir", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300,
                         env={**env, **ENV})
    (tmp_path / "ref.out").write_text(ref.stdout)
    assert ref.returncode == 0, ref.stderr
    root, go = str(tmp_path / "ck"), str(tmp_path / "go")
    argv = [*DIST_OFF, "--grace", "60", "--", *ddp, "--life-file", str(tmp_path / "life"), "--go-file", go,
            "--faults", "hold@step:4,-"]
    # the stop is agreed at the first agreement step one rank heard it by: step 4 (a save step), or one after it
    run, newest = ddp_sigterm_at_a_hold(tmp_path, root, argv, go, ENV)
    stopped = re.findall(r"writing an emergency checkpoint of step (\d+)", run.stderr())
    assert stopped == [str(newest.step)] * 2, run.stderr()
    first = run.stdout()
    again = Run(tmp_path, root, argv, env=ENV, name="again")
    assert again.wait(240) == 0, again.stderr()
    out = again.stdout()
    assert sorted(re.findall(r"start step=(\d+) rank=(\d)", out)) == [(str(newest.step), "0"),
                                                                              (str(newest.step), "1")], out
    _assert_same_run(ref.stdout, [first, out], ranks=2, batches=3)
    final = store.latest_valid(root)
    assert final.step == 9 and final.finished, final
