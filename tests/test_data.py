"""ckptd.DataLoader: the same batches after a resume at any position, any num_workers, no global RNG use."""

from __future__ import annotations

import pytest
import torch

import ckptd
from ckptd.errors import CkptdError

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

N, BATCH = 50, 8  # 7 batches per epoch, the last one short


def _dataset() -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(N))


def _epoch(loader) -> list[list[int]]:
    return [b[0].tolist() for b in loader]


def test_order_after_a_resume_at_every_position_is_the_uninterrupted_order_and_the_global_rng_is_untouched():
    full = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True, seed=5)
    before = torch.get_rng_state()
    epochs = [_epoch(full) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)  # torch's DataLoader.__iter__ alone would draw a seed
    assert epochs[0] != epochs[1] and sorted(sum(epochs[1], [])) == list(range(N))
    assert full.state_dict() == {"epoch": 2, "position": 7, "seed": 5}
    for epoch in range(2):
        for position in range(8):
            # a fresh process: another global seed, the checkpointed state loaded
            torch.manual_seed(99)
            resumed = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
            resumed.load_state_dict({"epoch": epoch, "position": position, "seed": 5})
            assert _epoch(resumed) == epochs[epoch][position:]  # possibly nothing: the epoch was done
            assert resumed.state_dict()["position"] == 7
            assert _epoch(resumed) == epochs[epoch + 1]  # the next iteration starts the next epoch


@pytest.mark.kind("system")
def test_two_workers_give_the_same_batches_as_none_after_a_mid_epoch_resume():
    ref = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True, seed=3)
    want = _epoch(ref)
    loader = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True, seed=3, num_workers=2)
    loader.load_state_dict({"epoch": 0, "position": 3, "seed": 3})
    before = torch.get_rng_state()
    assert _epoch(loader) == want[3:]
    assert torch.equal(torch.get_rng_state(), before)


def test_seed_follows_torch_manual_seed_like_randomsampler_and_set_epoch_names_the_epoch():
    torch.manual_seed(11)
    a = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    torch.manual_seed(12)
    b = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    assert a.seed == 11 and b.seed == 12 and _epoch(a) != _epoch(b)
    a.set_epoch(4)
    four = _epoch(a)
    c = ckptd.DataLoader(_dataset(), batch_size=BATCH, shuffle=True, seed=11)
    c.set_epoch(4)
    assert _epoch(c) == four and a.epoch == 4 and a.at_end


def test_with_a_distributed_sampler_each_rank_resumes_its_own_order():
    def loader(rank: int) -> ckptd.DataLoader:
        sampler = torch.utils.data.DistributedSampler(_dataset(), num_replicas=2, rank=rank, shuffle=True, seed=7)
        return ckptd.DataLoader(_dataset(), batch_size=4, sampler=sampler)

    full = {r: [] for r in (0, 1)}
    for r in (0, 1):
        dl = loader(r)
        for epoch in range(2):
            dl.set_epoch(epoch)
            full[r].append(_epoch(dl))
    assert set(sum(full[0][1], [])).isdisjoint(sum(full[1][1], []))  # each rank its own half
    assert full[0][0] != full[0][1]  # set_epoch reaches the DistributedSampler
    for r in (0, 1):
        dl = loader(r)
        dl.load_state_dict({"epoch": 1, "position": 2, "seed": dl.seed})
        dl.set_epoch(1)  # what Checkpointer.epochs() does: the epoch in progress keeps its position
        assert _epoch(dl) == full[r][1][2:]


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(N))


def test_what_cannot_be_resumed_is_refused_with_the_fix():
    with pytest.raises(CkptdError, match="batch_sampler"):
        ckptd.DataLoader(_dataset(), batch_sampler=[[0, 1]])
    with pytest.raises(CkptdError, match="mutually exclusive"):
        ckptd.DataLoader(_dataset(), shuffle=True, sampler=range(N))
    with pytest.raises(CkptdError, match="map-style"):
        ckptd.DataLoader(_Stream())
    with pytest.raises(CkptdError, match="seed= or generator="):
        ckptd.DataLoader(_dataset(), shuffle=True, seed=1, generator=torch.Generator())
