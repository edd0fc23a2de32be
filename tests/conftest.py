"""Shared fixtures: real checkpoints made by the real library in tmp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fixtures.sup_helpers import wait_for  # noqa: F401  (re-exported for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


def ckptd_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `ckptd` entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def small_model(seed: int = 0, width: int = 16):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train_steps(model, opt, n: int) -> float:
    import torch

    loss = torch.tensor(0.0)
    for _ in range(n):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def resign(ckpt: str, files: dict[str, bytes] | None = None) -> None:
    """What someone who can rewrite a checkpoint and its manifest together does (a crafted checkpoint): write
    ``files`` (name -> new content) into it, then rewrite the manifest so that it vouches for every listed file
    as it now is, and make it verify."""
    from ckptd import store

    for fname, data in (files or {}).items():
        with open(os.path.join(ckpt, fname), "wb") as f:
            f.write(data)
    mpath = os.path.join(ckpt, store.MANIFEST)
    with open(mpath) as f:
        m = json.load(f)
    for fname in m["files"]:
        size, digest = store.hash_file(os.path.join(ckpt, fname))
        m["files"][fname] = {"bytes": size, store.HASH: digest}
    m["digest"] = store._digest(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


@pytest.fixture(autouse=True)
def _no_leftover_supervisors():
    """Whatever a test asserted, every `ckptd run` it started is gone afterwards."""
    yield
    from fixtures.sup_helpers import LIVE_RUNS

    while LIVE_RUNS:
        LIVE_RUNS.pop().kill()


@pytest.fixture
def make_checkpoints(tmp_path):
    """Write real checkpoints at the given steps; returns the root."""

    def make(steps, root=None, metrics=None, kinds=None, **kw):
        import ckptd

        root = str(root or tmp_path / "ck")
        model, opt = small_model()
        ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, save_on_close=False, handle_signals=False, **kw)
        for s in steps:
            train_steps(model, opt, 1)
            m = (metrics or {}).get(s, {"loss": 1.0 / (s + 1)})
            ck.step(s, metrics=m)
            ck.save(kind=(kinds or {}).get(s, "periodic"), block=True)
        ck.close()
        return root

    return make
