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


# ---------------------------------------------------------------------------- kinds of test (CONTRIBUTING.md)
#
# unit:   in-process, starts no process (guarded below); the default for a developer: `pytest -m unit`.
# system: real processes (`ckptd run`, trainers, torchrun, systemd, Prometheus, `ckptd` commands).
# chaos:  bounded random fault runs (kills at random moments, random events or damage), the short versions
#         of scripts/*.py; CKPTD_TEST_LONG=1 (scripts/stress.sh) runs them at their long sizes.
# A module declares its kind with `pytestmark = pytest.mark.kind("unit")`, a test with
# `@pytest.mark.kind("system")` (the closest wins); unmarked tests are system tests. Each test then carries
# exactly one of the markers `unit`, `system`, `chaos`, which is what `-m` selects on. `python -m pytest -q
# -n 3` (CI) runs all three. `slow` marks a long test of any kind: long tests are handed out first, so that
# the workers finish together.
KINDS = ("unit", "system", "chaos")


def pytest_collection_modifyitems(config, items):
    for item in items:
        stray = [m.name for m in item.iter_markers() if m.name in KINDS]
        if stray:
            raise pytest.UsageError(f"{item.nodeid}: mark its kind as pytest.mark.kind({stray[0]!r}), not "
                                    f"pytest.mark.{stray[0]} (conftest.py)")
        mark = item.get_closest_marker("kind")
        kind = mark.args[0] if mark and mark.args else "system"
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: kind {kind!r} is none of {', '.join(KINDS)}")
        item.add_marker(kind)
    # Stable: the order within each group stays the collection order (module fixtures are shared as before).
    items.sort(key=lambda it: 0 if it.get_closest_marker("chaos") or it.get_closest_marker("slow") else 1)


def _no_child(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test started a process ({what}): mark the test `system` (CONTRIBUTING.md)")
    return refuse


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request, monkeypatch):
    """A test marked `unit` that starts a process fails, so the fast set stays fast and in-process."""
    if request.node.get_closest_marker("unit"):
        monkeypatch.setattr(subprocess.Popen, "__init__", _no_child("subprocess"))
        monkeypatch.setattr(os, "fork", _no_child("os.fork"))
        monkeypatch.setattr(os, "posix_spawn", _no_child("os.posix_spawn"))
        monkeypatch.setattr(os, "posix_spawnp", _no_child("os.posix_spawnp"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_reference_run_per_session(tmp_path_factory):
    """Under xdist, the workers share the uninterrupted reference runs (sup_helpers.shared) through the
    session's temporary folder (pytest keeps the last three sessions' and removes older ones)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from fixtures import sup_helpers

        sup_helpers.SHARED_DIR = str(tmp_path_factory.getbasetemp().parent)


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
