"""Real storage failures: ENOSPC on a small tmpfs, EIO/ENOSPC injected by strace at fsync, write and rename."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CHILD = os.path.join(ROOT, "tests", "fixtures", "storage_child.py")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _run_child(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _assert_aborted_cleanly(report: dict) -> None:
    assert report["first"] and report["first_after"], "the earlier checkpoint must stay intact"
    assert report["listing"] == ["step-000000000001"], f"nothing else may be visible: {report['listing']}"
    assert report["later_save_ok"], "a later save with room must succeed"
    assert report["restored_step"] == 4 and report["restored_equal"]


@pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces (unshare -m) for a private tmpfs")
@pytest.mark.parametrize("mode", ["enospc", "enospc-raise"])
def test_enospc_on_a_full_tmpfs_aborts_cleanly(tmp_path, mode):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=4m tmpfs "{mnt}" && exec "{sys.executable}" "{CHILD}" "{mnt}/ck" {mode}'
    report, stderr = _run_child(["unshare", "-m", "sh", "-c", script])
    _assert_aborted_cleanly(report)
    if mode == "enospc":
        assert report["raised"] is None and report["failed_count"] == 1
        assert "ENOSPC" in stderr and "training continues" in stderr
    else:
        assert (report["errno"] == 28 and "ENOSPC" in report["raised"]
                and "/ck/.tmp-step-000000000002" in report["raised"])


# Saves 1 and 4 succeed; save 2 must fail. All run in the writer thread (strace counts per thread);
# each save makes 5 fsyncs: tensors file, state file, manifest, temp directory, root directory; the
# first save of a process also fsyncs the root's parent (the root may be new: its entry must be durable).
FSYNC_FAULTS = {
    "fsync-tensors-eio": ("fsync", "EIO", 7),
    "fsync-manifest-eio": ("fsync", "EIO", 9),
    "fsync-tempdir-eio": ("fsync", "EIO", 10),
    "fsync-root-eio": ("fsync", "EIO", 11),
    "rename-exdev": ("rename", "EXDEV", 2),
}


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is needed for fault injection (apt-get install strace)")
@pytest.mark.parametrize("case", sorted(FSYNC_FAULTS))
def test_injected_storage_fault_aborts_cleanly(tmp_path, case):
    syscall, err, when = FSYNC_FAULTS[case]
    root = tmp_path / "ck"
    spec = f"inject={syscall}:error={err}:when={when}"
    cmd = ["strace", "-f", "--seccomp-bpf", "-qqq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", spec,
           sys.executable, CHILD, str(root), "fault"]
    report, stderr = _run_child(cmd)
    _assert_aborted_cleanly(report)
    assert report["failed_count"] == 1 and report["raised"] is None
    assert err in stderr and syscall in stderr and "not published" in stderr
    assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-"))]
