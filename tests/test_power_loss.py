"""Power loss at every point of the commit protocol: only fsynced data survives (issue 15, item 3).

scripts/power_loss.py records what each file and directory had fsynced at every os call of a save,
retention, prune, pin and quarantine, rebuilds the crash state at each point (exactly the synced state,
and random mixtures of synced, current, torn and zero-filled pieces) and checks what the next start finds.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import power_loss  # noqa: E402


def _failures(report: dict, words: str) -> list[str]:
    return [f for f in report["failures"] if words in f]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return power_loss.run(6, seed=15, work=str(tmp_path_factory.mktemp("power")))


def test_every_point_of_save_retention_prune_pin_and_quarantine_was_recorded(report):
    calls = report["recorded_calls"]
    for op in ("mkdir", "create", "write", "fsync", "rename", "unlink", "rmdir"):
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
