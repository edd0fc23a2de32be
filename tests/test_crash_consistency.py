"""SIGKILL at random moments during saves: no torn checkpoint is ever accepted."""

from __future__ import annotations

import os
import random
import select
import signal

import pytest
import torch

import ckptd
from ckptd import store
from fixtures.long_runs import size

# 60 kills in CI (well under a second each), half of them during async saves; 200 under CKPTD_TEST_LONG=1
# (scripts/stress.sh). scripts/chaos_kills.py's trainer mode kills savers the same way by the thousand.
ITERATIONS = size(60, 200)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))  # ~1 MiB


def _saver(root: str, w: int, async_save: bool) -> None:
    """Child: resume, then save step after step (params filled with the step number) until killed."""
    torch.set_num_threads(1)
    model = _model()
    ck = ckptd.Checkpointer(model=model, dir=root, keep_last=2, async_save=async_save,
                            handle_signals=False, save_on_close=False)
    step = ck.restore()
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        ck.step(step)
        ck.save(kind="periodic" if step % 3 else "manual")
        os.write(w, b".")


def _kill_one(root: str, rng: random.Random, async_save: bool) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            _saver(root, w, async_save)
        finally:
            os._exit(1)
    os.close(w)
    # wait for the child to be saving, then kill it at a random moment within the next saves
    ready, _, _ = select.select([r], [], [], 30)
    assert ready, "saver child did not start"
    os.read(r, 1)
    deadline = rng.uniform(0, 0.02)
    select.select([], [], [], deadline)  # a random moment, not a synchronisation wait
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)


@pytest.mark.kind("chaos")
def test_sigkill_during_saves_never_yields_a_torn_checkpoint(tmp_path):
    root = str(tmp_path / "ck")
    rng = random.Random(1234)
    restored_steps = []
    killed_mid_save = 0
    for i in range(ITERATIONS):
        _kill_one(root, rng, async_save=bool(i % 2))
        listed = store.list_checkpoints(root)
        killed_mid_save += any(n.startswith(store.TMP_PREFIX) for n in os.listdir(root))
        # every checkpoint visible under its final name verifies byte for byte
        for info in listed:
            full = store.verify(info.path)
            assert full.valid, f"iteration {i}: torn checkpoint visible: {info.name}: {full.reason}"
        assert listed, f"iteration {i}: the newest valid checkpoint was lost"
        model = _model()
        ck = ckptd.Checkpointer(model=model, dir=root, handle_signals=False, save_on_close=False)
        step = ck.restore()
        assert step == listed[-1].step, f"iteration {i}: restored {step}, newest valid is {listed[-1].step}"
        assert all(torch.all(p == step) for p in model.parameters()), f"iteration {i}: restored wrong data"
        restored_steps.append(step)
    assert killed_mid_save >= ITERATIONS // 10, f"only {killed_mid_save} kills landed inside a save"
    assert restored_steps == sorted(restored_steps)  # progress is never lost
    assert not os.path.exists(os.path.join(root, ".quarantine"))
