"""supervisor/states.py: the child's state machine allows only the transitions in its table."""

from __future__ import annotations

import pytest

from ckptd.supervisor.states import TRANSITIONS, ChildState, IllegalTransition, StateMachine

pytestmark = pytest.mark.kind("unit")

S = ChildState


def test_a_crash_restart_and_stop_walk_through_legal_transitions():
    sm = StateMachine()
    for state in (S.RUNNING, S.BACKOFF, S.RUNNING, S.STOPPING, S.KILLING, S.EXITED):
        sm.to(state)
    assert sm.terminal


@pytest.mark.parametrize("start, bad", [(S.IDLE, S.STOPPING), (S.BACKOFF, S.KILLING), (S.EXITED, S.RUNNING),
                                        (S.FATAL, S.BACKOFF), (S.KILLING, S.RUNNING)])
def test_illegal_transitions_raise(start, bad):
    with pytest.raises(IllegalTransition):
        StateMachine(start).to(bad)


def test_terminal_states_have_no_way_out_and_every_state_is_in_the_table():
    assert set(TRANSITIONS) == set(ChildState)
    assert not TRANSITIONS[S.EXITED] and not TRANSITIONS[S.FATAL]
