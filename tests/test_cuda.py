"""CUDA paths: pinned snapshot buffer, non_blocking copies, restore onto the GPU, CUDA RNG.

Skipped without a CUDA device (the CI machine has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import ckptd
from ckptd import store

pytestmark = [pytest.mark.kind("unit"), pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 64)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        x = torch.randn(32, 256, device="cuda")
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_snapshot_of_cuda_state_is_pinned_and_exact_while_training_goes_on(tmp_path):
    model, opt = gpu_model()
    train(model, opt, 3)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    ck.step(3)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    res = ck.save()
    assert ck._snapshot.buffer is not None and ck._snapshot.buffer.is_pinned()
    train(model, opt, 2)  # the loop goes on while the persist runs: the snapshot must not see it
    assert res.wait().error is None
    saved = ckptd.load_state(os.path.join(tmp_path, store.checkpoint_name(3)))
    for k, v in expected.items():
        assert torch.equal(saved["model"][k], v), k
    assert ck._snapshot.allocations == 1
    ck.step(5)
    ck.save().wait()
    assert ck._snapshot.allocations == 1  # reused, still pinned
    ck.close()


def test_restore_onto_the_gpu_resumes_weights_optimizer_and_cuda_rng(tmp_path):
    model, opt = gpu_model()
    train(model, opt, 4)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), handle_signals=False, save_on_close=False,
                            async_save=False)
    ck.step(4)
    ck.save()
    after = torch.randn(8, device="cuda")  # the CUDA RNG stream right after the checkpoint
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    exp_avg = [opt.state[p]["exp_avg"].detach().clone() for p in model.parameters()]
    ck.close()

    model2, opt2 = gpu_model(seed=1)
    train(model2, opt2, 1)
    ck2 = ckptd.Checkpointer(model=model2, optimizer=opt2, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    assert ck2.restore() == 4
    for k, v in model2.state_dict().items():
        assert v.is_cuda and torch.equal(v, weights[k]), k
    for p, e in zip(model2.parameters(), exp_avg, strict=True):
        assert opt2.state[p]["exp_avg"].is_cuda and torch.equal(opt2.state[p]["exp_avg"], e)
    assert torch.equal(torch.randn(8, device="cuda"), after)
    ck2.close()
