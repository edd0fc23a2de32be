"""What the supervisor's core knows about the run, and the verbs its decisions are written with.

:class:`Ledger` holds the decision state (the child's state machine, the current life, the stop request,
the save requests, the restart count) and an outbox of :mod:`actions`. The stop protocol (stopping.py),
the message handlers (messages.py) and the core (core.py) change the ledger and append actions; the core
hands the outbox to the loop. Nothing here does I/O.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import protocol
from . import actions as act
from .config import Config
from .control import Peer
from .notices import Notice
from .policy import RestartPolicy, is_step
from .states import ChildState, StateMachine

S = ChildState


@dataclass
class StopRequest:
    request_id: str
    reason: str
    deadline: float  # monotonic
    deadline_wall: float
    waiters: list[Peer] = field(default_factory=list)
    confirmed: bool = False  # a trainer reported its emergency checkpoint committed
    notice: Notice | None = None  # the cloud notice that asked for this stop
    signalled: bool = False  # a SIGTERM/SIGINT arrived after that notice (the same preemption)
    committed_at: float | None = None  # unix time the emergency checkpoint was reported committed
    committed_step: int | None = None
    no_checkpoint: str | None = None  # why the trainer did not write one (it says so in `stopping`)
    acked: set[str] = field(default_factory=set)  # Azure events acknowledged
    requested_at: float = 0.0  # unix time of the request
    joined: bool = False  # not asked of this supervisor: the job stopped elsewhere (another node, a rank's signal)


@dataclass
class Life:
    """What the core knows about the current child process."""

    pid: int
    started: float  # monotonic
    last_step: int | None = None
    stepped: bool = False  # a trainer reported a completed step (heartbeat, saved) in this life
    connected: bool = False  # a trainer of this life spoke the control protocol
    hang: bool = False  # we are killing it because it stopped sending heartbeats
    stopped_with_checkpoint: bool = False  # a trainer said `stopping` with exit code 85 (its checkpoint committed)
    we_killed: bool = False  # we sent SIGKILL (so a SIGKILL death is not an OOM)
    deadline: float | None = None  # STOPPING: when to SIGKILL


class Ledger:
    def __init__(self, cfg: Config, policy: RestartPolicy, *, socket_dir: str = "") -> None:
        self.cfg = cfg
        self.policy = policy
        self.socket_dir = socket_dir  # where trainers' stack dumps must be (the control socket's directory)
        self.sm = StateMachine()
        self.life: Life | None = None
        self.stop: StopRequest | None = None
        self.saves: dict[str, list[Peer]] = {}  # save request id -> clients waiting for its outcome
        self.restarts = 0
        self.exit_code: int | None = None
        self.step: int | None = None
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_exit: dict[str, Any] | None = None
        self.backoff_until: float | None = None
        self.resume: dict[str, Any] | None = None  # set between a crash and the restart it leads to
        self.expected_resume: int | None = None  # the step a restarted life should resume at (newest checkpoint)
        self.restore_reported = False  # a trainer of the current (or last) life reported its restore: `resumed`
        self.resumed_from: str | None = None  # pinned: retention never deletes the checkpoint a run resumed from
        self.person_saves: set[str] = set()  # ids of saves a person asked for (ckptd save, SIGUSR1): pinned
        self.trainer_seen = False  # some life of this run connected: restarts resume from checkpoints
        self.notice: dict[str, Any] | None = None  # the last cloud notice acted on (`ckptd status`)
        self.notice_saves: dict[str, str] = {}  # save request id -> Azure event to acknowledge after it
        self.pending_acks: list[str] = []  # Azure events that arrived during a stop already under way
        self.out: list[act.Action] = []

    # --- verbs ----------------------------------------------------------------------------------

    def emit(self, action: act.Action) -> None:
        self.out.append(action)

    def take(self) -> list[act.Action]:
        out, self.out = self.out, []
        return out

    def event(self, level: str, event: str, msg: str, *, lines: list[str] | tuple[str, ...] = (),
              quiet: bool = False, **fields: Any) -> None:
        self.emit(act.Record(level, event, msg, fields, tuple(lines), quiet))

    def log(self, level: str, event: str, msg: str) -> None:
        self.emit(act.Log(level, event, msg))

    def metric(self, method: str, *args: Any) -> None:
        self.emit(act.Metric(method, args))

    def save_state(self) -> None:
        self.emit(act.SaveState())

    def send(self, peer: Peer, type_: str, *, close: bool = False, **fields: Any) -> None:
        self.emit(act.Send(peer, type_, fields, close))

    def reply_and_close(self, peer: Peer, type_: str, **fields: Any) -> None:
        peer.waiting = False
        self.send(peer, type_, close=True, **fields)

    def saw_step(self, step: Any, completed: bool = False) -> None:
        if not is_step(step):
            return
        self.step = step
        if self.life is not None:
            self.life.last_step = step
            self.life.stepped = self.life.stepped or completed
        if completed:
            self.metric("step", step)
        if self.policy.observe_step(step):
            self.log("info", "progress", f"training progressed to step {step}: restart budget refilled")

    def request_save(self, view: act.View, source: str, *, kind: str = "manual", waiter: Peer | None = None,
                     hurry: bool = False) -> str | None:
        """Ask every trainer for a checkpoint; the request's id, or None when no trainer can take it."""
        trainers = view.trainers if self.sm.state is S.RUNNING else ()
        if not trainers:
            why = {S.STOPPING: "the trainer is stopping", S.KILLING: "the trainer is being killed",
                   S.BACKOFF: "the trainer is between restarts"}.get(self.sm.state)
            if why is None and self.sm.state is S.RUNNING and self.life is not None and self.trainer_seen:
                # A trainer of this run spoke before: this life's will connect once its script creates the
                # Checkpointer (after a restart, imports and data loading take a while).
                why = ("the trainer is exiting (it disconnected)" if self.life.connected else
                       f"the trainer is starting (pid {self.life.pid} has not connected yet)")
            self.log("info" if why else "warning", "save_skipped", f"checkpoint request from {source} skipped: "
                     + (why or "no trainer is connected (the script does not use ckptd.Checkpointer, or has not "
                               "created one yet)"))
            return None
        request_id = uuid.uuid4().hex[:12]
        for peer in trainers:
            self.send(peer, protocol.SAVE, request_id=request_id, kind=kind, wait=waiter is not None or hurry)
        self.saves[request_id] = [waiter] if waiter else []
        self.metric("save_requested", request_id)
        if waiter is not None:
            waiter.waiting = True
        self.log("info", "save_requested", f"checkpoint requested by {source} (request {request_id})")
        return request_id

    def hang_due(self, view: act.View) -> float | None:
        """When the quietest trainer's silence reaches ``hang_timeout`` (monotonic); None: not watched."""
        if self.sm.state is not S.RUNNING or not self.cfg.hang_timeout or not view.trainers:
            return None
        return min(p.last_seen for p in view.trainers) + self.cfg.hang_timeout

    def next_due(self, view: act.View) -> float | None:
        """The core's next deadline (monotonic): a stop's grace, the end of a backoff, a hang."""
        due = [t for t in (self.backoff_until, self.life.deadline if self.life else None, self.hang_due(view))
               if t is not None]
        return min(due) if due else None


def stack_path(peer: Peer, socket_dir: str) -> str | None:
    """The stack file a trainer announced, only if it is where ours are (the run's private directory)."""
    if not socket_dir or not peer.stack_file or not peer.pid:
        return None
    expected = os.path.join(socket_dir, f"stacks-{peer.pid}.txt")
    return expected if peer.stack_file == expected else None


def ckpt_record(name: str, step: Any, kind: Any, created: float) -> dict[str, Any]:
    return {"name": name, "step": step, "kind": kind, "time": created}


def fmt(value: Any) -> str:
    return "?" if value is None else str(value)
