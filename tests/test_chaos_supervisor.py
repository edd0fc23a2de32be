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
from fixtures.long_runs import size


@pytest.mark.kind("chaos")
@pytest.mark.timeout(600)
def test_random_events_of_every_kind_end_bit_identical_with_no_lost_steps_on_a_stop_and_a_full_journal(tmp_path):
    # Bounded: with seed 119 the first 7 events are one of each kind (seed 15's first 10 were 4 kinds only);
    # CKPTD_TEST_LONG=1 runs 20, and scripts/chaos_supervisor.py --count 200 is the long run.
    # An event uses at most ~1 s of training (the wait before it, the next life's first step): ~150 steps at
    # this delay on a quiet machine, fewer on a busy one; 300 more for the run's end.
    count = size(7, 20)
    report = chaos_supervisor.run(count, steps=150 * count + 300, delay=0.004, seed=119, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["events"] == count
    assert set(report["by_event"]) == set(chaos_supervisor.EVENTS), report["by_event"]
    for event in ("sigterm", "notice", "stop"):
        if event in report["lost_steps"]:
            assert report["lost_steps"][event]["max"] == 0
    assert report["goodput_steps"] > 0.5


@pytest.mark.kind("chaos")
def test_75_start_exit_cycles_leave_no_zombie_no_fd_and_flat_rss(tmp_path):
    report = hygiene.run(75, work=str(tmp_path))
    assert report["failed"] == 0, report["failures"]
    assert report["cycles"] >= 75 and report["zombies_max"] == 0
