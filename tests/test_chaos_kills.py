"""Random SIGKILLs during saves, of the trainer, `ckptd prune` and `ckptd run`.

The bounded version of scripts/chaos_kills.py (whose long run's figures are in docs/reliability.md).
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import chaos_kills
from ckptd import store
from fixtures.long_runs import size


@pytest.mark.kind("chaos")
def test_random_kills_of_trainer_prune_and_supervisor_never_accept_a_torn_checkpoint(tmp_path):
    # 30 kills in CI (24 of a trainer, 3 of `ckptd prune`, 3 of `ckptd run`); 60 under CKPTD_TEST_LONG=1
    count = size(30, 60)
    report = chaos_kills.run(count, ["trainer", "prune", "supervisor"], seed=15, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["kills"] >= count
    rounds = {m: r["rounds"] for m, r in report["modes"].items()}
    assert rounds == {"trainer": count * 8 // 10, "prune": count // 10, "supervisor": count // 10}, rounds
    # Where a kill lands depends on this machine's timing (about half of them land inside a save or a
    # deletion here); a quarter, spread over at least two phases, shows that the path itself was hit.
    inside = {k: v for k, v in report["phases"].items() if k not in ("between", "completed")}
    assert sum(inside.values()) >= report["kills"] // 4, f"too few kills inside a save or deletion: {report['phases']}"
    assert len(inside) >= 2, f"kills landed in fewer than two phases of the save path: {report['phases']}"


def test_a_temp_directory_of_a_dead_but_unreaped_writer_is_removed_at_the_next_start(tmp_path):
    # A SIGKILLed supervisor's trainer stays a zombie until its new parent reaps it (and a container's
    # PID 1 may never do so): it writes nothing more, so its temp directory must not outlive it.
    root = tmp_path / "ck"
    root.mkdir()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    try:
        chaos_kills._wait_gone(pid)  # now a zombie: exited, not reaped
        name = f"{store.TMP_PREFIX}step-000000000007-{socket.gethostname()}-{pid}-0123abcd"
        (root / name).mkdir()
        assert store.remove_stale_temps(str(root)) == [name]
        assert not (root / name).exists()
    finally:
        os.waitpid(pid, 0)
