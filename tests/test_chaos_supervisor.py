"""Supervisor chaos and hygiene: the bounded versions of
scripts/chaos_supervisor.py and scripts/hygiene.py."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import chaos_supervisor
import hygiene


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_10_random_events_end_bit_identical_with_bounded_lost_steps_and_a_full_journal(tmp_path):
    # bounded: 10 events (every kind appears with this seed); scripts/chaos_supervisor.py --count 40 is the long run
    report = chaos_supervisor.run(10, steps=2500, delay=0.004, seed=15, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["events"] == 10
    for event in ("sigterm", "notice", "stop"):
        if event in report["lost_steps"]:
            assert report["lost_steps"][event]["max"] == 0
    assert report["goodput_steps"] > 0.5


@pytest.mark.slow
def test_75_start_exit_cycles_leave_no_zombie_no_fd_and_flat_rss(tmp_path):
    report = hygiene.run(75, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["cycles"] >= 75 and report["zombies_max"] == 0
