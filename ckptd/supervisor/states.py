"""The child's state machine: one Enum, the legal transitions in one table.

    IDLE --spawn--> RUNNING --exit 0 / give up--> EXITED / FATAL
                    RUNNING --crash--> BACKOFF --timer--> RUNNING
                    RUNNING --stop/hang--> STOPPING --grace over--> KILLING
    STOPPING/KILLING --exit--> EXITED (stop asked) | BACKOFF (hang, restart) | FATAL (budget spent)

A transition not in :data:`TRANSITIONS` is a bug in the supervisor and raises.
"""

from __future__ import annotations

import enum


class ChildState(enum.Enum):
    IDLE = "idle"  # nothing started yet
    RUNNING = "running"  # the child runs
    STOPPING = "stopping"  # asked to stop (stop request or SIGTERM sent); grace deadline pending
    KILLING = "killing"  # grace ran out: SIGKILL sent to the group, waiting to reap
    BACKOFF = "backoff"  # the child exited; waiting before the next start
    EXITED = "exited"  # done: training finished or stopped on request (terminal)
    FATAL = "fatal"  # gave up (terminal)


S = ChildState
TRANSITIONS: dict[ChildState, frozenset[ChildState]] = {
    S.IDLE: frozenset({S.RUNNING, S.BACKOFF, S.EXITED, S.FATAL}),  # spawn failure -> BACKOFF or FATAL
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.EXITED, S.FATAL}),
    S.STOPPING: frozenset({S.KILLING, S.BACKOFF, S.EXITED, S.FATAL}),
    S.KILLING: frozenset({S.BACKOFF, S.EXITED, S.FATAL}),
    S.BACKOFF: frozenset({S.RUNNING, S.BACKOFF, S.EXITED, S.FATAL}),  # BACKOFF -> BACKOFF: spawn failed again
    S.EXITED: frozenset(),
    S.FATAL: frozenset(),
}
TERMINAL = frozenset({S.EXITED, S.FATAL})
CHILD_ALIVE = frozenset({S.RUNNING, S.STOPPING, S.KILLING})


class IllegalTransition(RuntimeError):
    """A bug: the supervisor tried a transition the table does not allow."""


class StateMachine:
    def __init__(self, state: ChildState = ChildState.IDLE) -> None:
        self.state = state

    def to(self, new: ChildState) -> ChildState:
        """Move to ``new``; return the old state."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{old.name} -> {new.name} is not a legal child transition")
        self.state = new
        return old

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def child_alive(self) -> bool:
        return self.state in CHILD_ALIVE
