"""Kill or fail (ENOSPC / EIO / EDQUOT) the N-th write, fsync, close, rename, mkdir, unlink or open of a
save, of retention and of `ckptd prune`: a sample of scripts/syscall_sweep.py's cases."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import syscall_sweep


@pytest.mark.kind("chaos")
@pytest.mark.skipif(not shutil.which("strace"), reason="strace is needed for fault injection (apt-get install strace)")
def test_a_fault_at_any_syscall_of_save_retention_and_prune_keeps_every_promise(tmp_path):
    report = syscall_sweep.run(24, seed=15, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    for op in ("save", "retention", "prune"):
        calls = report["ops"][op]["calls"]
        assert {"open", "close", "fsync", "rename"} <= set(calls), (op, calls)
        assert report["ops"][op]["outcomes"].get("clear error"), report["ops"][op]
    assert {"write", "mkdir"} <= set(report["ops"]["save"]["calls"])
    assert "unlink" in report["ops"]["prune"]["calls"]
