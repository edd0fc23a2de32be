"""supervisor/policy.py: exit classification, exponential backoff with jitter, restart budget."""

from __future__ import annotations

import random
import signal

import pytest

from ckptd import exitcodes
from ckptd.supervisor.clock import FakeClock
from ckptd.supervisor.policy import ExitStatus, Reason, RestartPolicy, classify

pytestmark = pytest.mark.kind("unit")


def policy(**kw):
    args = dict(max_restarts=3, window=100.0, base=1.0, cap=8.0, same_step_limit=3, rng=random.Random(7))
    args.update(kw)
    return RestartPolicy(**args)


def test_backoff_doubles_up_to_the_cap_with_equal_jitter():
    p = policy()
    for n, full in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (40, 8)]:
        for _ in range(20):
            d = p.backoff(n)
            assert full / 2 <= d <= full


def test_budget_is_spent_after_max_restarts_within_the_window():
    clock, p = FakeClock(), policy()
    for _ in range(3):
        assert p.on_failure(clock.monotonic(), None).restart
        clock.advance(1)
    d = p.on_failure(clock.monotonic(), None)
    assert not d.restart and "budget" in d.why


def test_restarts_older_than_the_window_fall_out_of_the_budget():
    clock, p = FakeClock(), policy(window=10.0)
    for _ in range(3):
        assert p.on_failure(clock.monotonic(), None).restart
    clock.advance(11)
    assert p.on_failure(clock.monotonic(), None).restart


def test_progress_beyond_the_previous_high_water_mark_refills_the_budget_and_resets_backoff():
    clock, p = FakeClock(), policy()
    p.observe_step(50)
    for step in (50, 51):
        assert p.on_failure(clock.monotonic(), step).restart
    assert p.restarts_in_window == 2
    assert not p.observe_step(40)  # resumed from an older checkpoint: not progress yet
    assert not p.observe_step(51)
    assert p.observe_step(52)
    assert p.restarts_in_window == 0
    assert p.on_failure(clock.monotonic(), 60).delay <= 1.0  # backoff starts over


def test_the_same_step_crashing_k_times_in_a_row_gives_up():
    clock, p = FakeClock(), policy(max_restarts=100, same_step_limit=3)
    assert p.on_failure(clock.monotonic(), 7).restart
    assert p.on_failure(clock.monotonic(), 7).restart
    d = p.on_failure(clock.monotonic(), 7)
    assert not d.restart and "step 7 crashed 3 times" in d.why


def test_unknown_steps_never_count_as_the_same_step():
    clock, p = FakeClock(), policy(max_restarts=100, same_step_limit=2)
    for _ in range(5):
        assert p.on_failure(clock.monotonic(), None).restart


def classify_(status, **kw):
    args = dict(stop_requested=False, hang=False, we_killed=False, oom_kills=0, no_restart=frozenset())
    args.update(kw)
    return classify(status, **args)


def test_failing_n_times_in_a_row_before_the_first_step_gives_up_and_a_started_life_resets_the_count():
    clock, p = FakeClock(), policy(max_restarts=100, start_failure_limit=3)
    assert p.on_failure(clock.monotonic(), None, before_first_step=True).restart
    assert p.on_failure(clock.monotonic(), None, before_first_step=True).restart
    assert p.on_failure(clock.monotonic(), 7, before_first_step=False).restart  # that life trained: count resets
    assert p.on_failure(clock.monotonic(), None, before_first_step=True).restart
    assert p.on_failure(clock.monotonic(), None, before_first_step=True).restart
    d = p.on_failure(clock.monotonic(), None, before_first_step=True)
    assert not d.restart and "3 times in a row before its first step" in d.why


def test_classify_names_each_way_a_child_ends():
    assert classify_(ExitStatus(1, code=0)).reason is Reason.FINISHED
    assert classify_(ExitStatus(1, code=exitcodes.PREEMPTED), stop_requested=True).reason is Reason.PREEMPTED
    assert classify_(ExitStatus(1, signal=signal.SIGTERM), stop_requested=True).reason is Reason.STOPPED
    assert classify_(ExitStatus(1, code=2)).reason is Reason.ERROR
    assert classify_(ExitStatus(1, code=exitcodes.CONFIG)).reason is Reason.NO_RESTART
    assert classify_(ExitStatus(1, code=9), no_restart=frozenset({9})).reason is Reason.NO_RESTART
    assert classify_(ExitStatus(1, signal=signal.SIGSEGV)).reason is Reason.SIGNAL
    outside = classify_(ExitStatus(1, signal=signal.SIGKILL))  # nobody counted an OOM kill: not called one
    assert outside.reason is Reason.SIGNAL and "no OOM kill was counted" in outside.detail
    oom = classify_(ExitStatus(1, signal=signal.SIGKILL), system_oom_kills=1)
    assert oom.reason is Reason.OOM and "perhaps out of memory" in oom.detail
    assert "oom_kill" in classify_(ExitStatus(1, signal=signal.SIGKILL), oom_kills=1).detail
    assert classify_(ExitStatus(1, signal=signal.SIGKILL), we_killed=True).reason is Reason.SIGNAL
    assert classify_(ExitStatus(1, signal=signal.SIGKILL), hang=True, we_killed=True).reason is Reason.HANG


def test_exit_status_decodes_wait_statuses():
    assert ExitStatus.from_wait(5, 3 << 8) == ExitStatus(5, code=3)
    assert ExitStatus.from_wait(5, signal.SIGKILL) == ExitStatus(5, signal=signal.SIGKILL)
    assert ExitStatus(5, signal=signal.SIGKILL).describe() == "killed by SIGKILL"
