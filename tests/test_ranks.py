"""The save path and the restore loop are one code for every world size (ranks.py): a strategy that stands for
a peer rank drives them in-process, without torch.distributed. A peer's refusal of a candidate puts this rank's
tensors back and the leader quarantines it naming the peer; a peer's failed write publishes nothing."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
import ckptd  # noqa: E402
from ckptd import store  # noqa: E402
from ckptd.errors import CkptdError  # noqa: E402
from ckptd.ranks import Solo  # noqa: E402

pytestmark = pytest.mark.kind("unit")


class PeerRanks(Solo):
    """This process is the leader of two ranks; rank 1's verdicts and write errors are scripted."""

    world = 2

    def __init__(self, refuse: list[str] | None = None, write_error: str = "") -> None:
        super().__init__(0, leader=True)
        self.refuse = list(refuse or [])  # rank 1's verdict on each candidate in turn ("" accepts)
        self.write_error = write_error

    def verdicts(self, mine):
        why = self.refuse.pop(0) if self.refuse else ""
        return [mine, (why, "")]

    def gather(self, mine):
        return [mine, ({}, self.write_error)]

    def who(self, rank: int, what: str) -> str:
        return f"rank {rank}: {what}"


def make(tmp_path, seed: int) -> tuple[ckptd.Checkpointer, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(32, 32)
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path / "ck"), handle_signals=False, save_on_close=False,
                            on_error="raise")
    return ck, model


def test_a_candidate_a_peer_refuses_is_quarantined_naming_the_peer_and_the_next_older_is_applied(tmp_path):
    ck, model = make(tmp_path, seed=1)
    saved = {}
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ck.step(step)
        ck.save(block=True)
        saved[step] = model.weight.clone()
    ck.close()

    ck2, live = make(tmp_path, seed=2)
    before = live.weight.clone()
    ck2._solo = PeerRanks(refuse=["tensors.safetensors checksum mismatch"])
    assert ck2.restore() == 1  # step 2 refused by rank 1: every rank moves on to step 1
    assert torch.equal(live.weight, saved[1]) and not torch.equal(live.weight, before)
    assert [i.step for i in store.list_checkpoints(ck2.dir)] == [1]
    (quarantined,) = os.listdir(os.path.join(ck2.dir, ".quarantine"))
    with open(os.path.join(ck2.dir, ".quarantine", quarantined, "QUARANTINE.json")) as f:
        assert "rank 1: tensors.safetensors checksum mismatch" in f.read()
    ck2.close()


def test_when_a_peer_refuses_every_candidate_the_run_keeps_its_own_tensors(tmp_path):
    ck, model = make(tmp_path, seed=1)
    ck.step(1)
    ck.save(block=True)
    ck.close()

    ck2, live = make(tmp_path, seed=2)
    before = live.weight.clone()
    ck2._solo = PeerRanks(refuse=["rank part missing"])
    assert ck2.restore() == 0
    assert torch.equal(live.weight, before)  # read in place, then put back from the undo log
    ck2.close()


def test_a_peer_whose_write_failed_leaves_nothing_published_and_every_rank_raises_naming_it(tmp_path):
    ck, _ = make(tmp_path, seed=1)
    ck._solo = PeerRanks(write_error="[Errno 28] No space left on device")
    ck.step(5)
    with pytest.raises(CkptdError, match=r"not published: rank 1: \[Errno 28\] No space left on device"):
        ck.save(block=True)
    assert store.list_checkpoints(ck.dir) == []
    assert not [n for n in os.listdir(ck.dir) if n.startswith(store.TMP_PREFIX)]  # the leader removed its temp
    ck.close()
