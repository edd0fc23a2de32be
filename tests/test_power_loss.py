"""Power loss at every point of the commit protocol: only fsynced data survives.

scripts/power_loss.py records what each file and directory had fsynced at every os call of a save,
retention, prune, pin, quarantine and close() (the final state swapped in, the manifest marked finished),
rebuilds the crash state at each point (exactly the synced state, and random mixtures of synced, current,
torn and zero-filled pieces) and checks what the next start finds.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import power_loss

pytestmark = pytest.mark.kind("chaos")


def _failures(report: dict, words: str) -> list[str]:
    return [f for f in report["failures"] if words in f]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return power_loss.run(6, seed=15, work=str(tmp_path_factory.mktemp("power")))


def test_every_point_of_save_retention_prune_pin_and_quarantine_was_recorded(report):
    calls = report["recorded_calls"]
    for op in ("mkdir", "create", "write", "fsync", "rename", "unlink", "rmdir", "exchange"):
        assert calls.get(op), f"no {op} recorded: {calls}"
    assert report["points"] >= 80 and report["crash_states"] >= 7 * report["points"]


def test_the_first_checkpoint_of_a_new_directory_survives_power_loss(report):
    # The root a first save creates must itself be durable (its parent fsynced), or a committed
    # checkpoint vanishes with the whole directory.
    assert not _failures(report, "the checkpoint root is gone"), _failures(report, "root is gone")[:3]


def test_a_returned_pin_survives_power_loss(report):
    assert not _failures(report, "pin of"), _failures(report, "pin of")[:3]


def test_no_crash_state_at_any_point_breaks_a_promise(report):
    assert report["failed"] == 0, report["failures"]


class _Pick:
    """A mixture that keeps every directory's synced listing and takes every file's current bytes."""

    def choice(self, seq):
        return "synced" if len(seq) == 2 else "current"

    def randrange(self, n):
        return n - 1


def _point(rec, prefix):
    found = [p for p in rec.points if p[0].startswith(prefix)]
    assert found, f"no {prefix} point recorded: {[p[0] for p in rec.points]}"
    return found[0]


def _replace_by_rename(base):
    """A synced d/f replaced by a synced temp renamed over it; the directory not fsynced after."""
    d = os.path.join(base, "d")
    fd = os.open(os.path.join(base, "t"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.write(fd, b"new")
    os.fsync(fd)
    os.close(fd)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(os.path.join(base, "t"), "f", dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def test_a_name_replaced_by_rename_keeps_its_old_bytes_where_the_rename_is_not_durable(tmp_path):
    # Renaming over a name unlinks the old inode but never changes its bytes: a crash state whose
    # directory still lists the old entry finds the old file whole (never an empty one).
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    (base / "d" / "f").write_bytes(b"old")  # before recording: durable
    with power_loss.Recorder(str(base)) as rec:
        _replace_by_rename(str(base))
        os.unlink(os.path.join(str(base), "d", "f"))
        fd = os.open(os.path.join(str(base), "g"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # may reuse a number
        os.close(fd)
    label, current, synced, _ = _point(rec, "rename")
    for rng in (None, _Pick()):
        dest = tmp_path / f"crash-{rng is None}"
        power_loss.materialize(str(dest), synced, current, rng)
        assert (dest / "d" / "f").read_bytes() == b"old", label
    label, current, synced, _ = rec.points[-1]
    dest = tmp_path / "crash-last"
    power_loss.materialize(str(dest), synced, current, _Pick())
    assert (dest / "d" / "f").read_bytes() == b"old", label  # the new g is another inode, whatever its number
    assert not (dest / "g").exists(), label  # neither it nor its directory was fsynced


def test_an_exchange_is_a_point_and_the_synced_view_keeps_the_old_names_until_the_fsync(tmp_path):
    from ckptd import store

    base = tmp_path / "base"
    (base / "a").mkdir(parents=True)
    (base / "b").mkdir()
    (base / "a" / "x").write_bytes(b"in a")
    with power_loss.Recorder(str(base)) as rec:
        store.rename_exchange(str(base / "a"), str(base / "b"))
        store.fsync_dir(str(base))
    label, current, synced, _ = _point(rec, "exchange")
    dest = tmp_path / "crash"
    power_loss.materialize(str(dest), synced, current, None)
    assert (dest / "a" / "x").read_bytes() == b"in a", label
    label, current, synced, _ = rec.points[-1]
    dest = tmp_path / "crash-after"
    power_loss.materialize(str(dest), synced, current, None)
    assert (dest / "b" / "x").read_bytes() == b"in a" and not (dest / "a" / "x").exists(), label
