"""The stop protocol: one stop request per run, its deadline, notices, acknowledgements, the end of a run.

A stop comes from a signal (SIGTERM, SIGINT, the requeue signal), ``ckptd stop``, a cloud notice, or a
trainer that stops because the job stopped elsewhere (it is joined). The first makes the run's one
:class:`~ckptd.supervisor.ledger.StopRequest`: ``stop{deadline}`` to every trainer (SIGTERM to the child
when none speaks the protocol) and the kill deadline. A second signal forces the stop (SIGTERM, SIGKILL
after ``force_grace``) except the platform's SIGTERM after its own notice, which is the same preemption.
In backoff there is no child: the run ends at once (86). docs/architecture.md, "Path of a preemption".

Pure: functions over a :class:`~ckptd.supervisor.ledger.Ledger` and a :class:`~ckptd.supervisor.actions.View`.
"""

from __future__ import annotations

import signal
import uuid
from typing import Any

from .. import exitcodes, protocol
from . import actions as act
from .control import Peer
from .ledger import Ledger, Life, StopRequest, fmt
from .notices import Notice
from .policy import ExitStatus, is_step
from .states import ChildState

S = ChildState


def end(led: Ledger, state: ChildState, code: int, why: str) -> None:
    """The run is over: ``state`` (EXITED or FATAL), exit ``code``."""
    led.exit_code = code
    led.sm.to(state)
    led.metric("training_ended")
    if led.stop is not None:
        after_stop(led, code)
    led.event("info" if code in (0, exitcodes.PREEMPTED) else "warning", "end",
              f"{why}; exiting with {code} ({exitcodes.DESCRIPTIONS.get(code, 'child exit code')})",
              exit_code=code, restarts=led.restarts)
    led.emit(act.Exit(code))


def request_stop(led: Ledger, view: act.View, reason: str, *, force: bool = False, waiter: Peer | None = None,
                 notice: Notice | None = None) -> str:
    """Stop the run (``force``: a second stop takes the fast path); the stop request's id."""
    if led.stop is None:
        grace = led.cfg.grace
        if notice is not None and notice.deadline is not None:  # the platform's deadline replaces the grace
            grace = max(1.0, notice.deadline - view.wall)
        _new_stop(led, view, reason, grace, notice.deadline if notice else None, notice=notice)
        _begin_stop(led, view)
    elif force and led.life is not None:
        _force_stop(led, view, led.life, reason)
    elif force and led.sm.state in (S.STOPPING, S.KILLING):  # no child left, yet not ended: end now
        end(led, S.EXITED, exitcodes.PREEMPTED if led.stop.confirmed else exitcodes.STOPPED_NO_CHECKPOINT,
            f"second {reason} with no child left")
    assert led.stop is not None
    if waiter is not None:
        waiter.waiting = True
        led.stop.waiters.append(waiter)
    return led.stop.request_id


def _new_stop(led: Ledger, view: act.View, reason: str, grace: float, deadline_wall: float | None = None,
              **kw: Any) -> None:
    """Record a stop whose deadline is ``grace`` seconds away (a notice's own deadline when it has one)."""
    led.stop = StopRequest(uuid.uuid4().hex[:12], reason, view.now + grace,
                           deadline_wall if deadline_wall is not None else view.wall + grace,
                           requested_at=view.wall, **kw)
    led.metric("stop_requested", led.stop.deadline_wall)
    led.emit(act.ServiceStopping(reason))


def _begin_stop(led: Ledger, view: act.View) -> None:
    stop, life = led.stop, led.life
    assert stop is not None
    if led.sm.state in (S.IDLE, S.BACKOFF):
        led.backoff_until = None
        led.event("info", "stop_requested", f"stop requested ({stop.reason}) while no trainer runs",
                  reason=stop.reason)
        end(led, S.EXITED, exitcodes.STOPPED_NO_CHECKPOINT, "stopped between restarts")
        return
    if life is None:
        return
    trainers = view.trainers
    if led.sm.state is S.RUNNING:
        if trainers:
            for peer in trainers:
                led.send(peer, protocol.STOP, request_id=stop.request_id, deadline=stop.deadline_wall,
                         reason=stop.reason)
        else:
            led.emit(act.SignalChild(signal.SIGTERM))  # the script does not speak the protocol
        life.deadline = stop.deadline
        led.sm.to(S.STOPPING)
    via = "control channel" if trainers else "SIGTERM"
    grace = round(stop.deadline - view.now, 3) if stop.notice else led.cfg.grace
    led.event("info", "stop_requested", f"stop requested ({stop.reason}): asked the trainer via {via}; "
              + (f"deadline in {grace:.1f} s" if stop.notice else f"grace {grace:g} s"),
              reason=stop.reason, via=via, grace=grace, deadline=stop.deadline_wall)
    led.save_state()


def join_stop(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    """A trainer stops though nobody asked this supervisor: the job's stop came from elsewhere (another
    node's supervisor, whose ranks agreed on it with ours in ``ck.step()``, or a signal to a rank). Judge
    the exit like a stop of our own: exit 85 when the emergency checkpoint it reports is on disk."""
    step, code = msg.get("step"), msg.get("exit_code")
    _new_stop(led, view, "the job stopped elsewhere", led.cfg.grace, joined=True)
    assert led.stop is not None
    if led.life is not None:
        led.life.deadline = led.stop.deadline
    led.sm.to(S.STOPPING)
    led.event("info", "stop_requested", f"trainer pid {peer.pid} (rank {fmt(peer.rank)}) stops at step "
              f"{fmt(step)} with exit code {fmt(code)} without a stop asked of this supervisor: the job "
              f"stopped elsewhere; waiting {led.cfg.grace:g} s for it to exit", reason=led.stop.reason,
              via="trainer", grace=led.cfg.grace, step=step, rank=peer.rank)
    # Rescanned.emergency answers whether that step's checkpoint on disk is the emergency one.
    asked = step if code == exitcodes.PREEMPTED and is_step(step) else None
    led.emit(act.Rescan(emergency_step=asked))
    led.save_state()


def _force_stop(led: Ledger, view: act.View, life: Life, reason: str) -> None:
    if led.sm.state is not S.STOPPING:
        return
    led.emit(act.SignalChild(signal.SIGTERM))
    deadline = view.now + led.cfg.force_grace
    life.deadline = min(life.deadline or deadline, deadline)
    led.event("warning", "stop_forced", f"second {reason}: SIGTERM to pid {life.pid}, "
              f"SIGKILL in {led.cfg.force_grace:g} s", reason=reason)


def second_stop(led: Ledger, name: str) -> bool:
    """A second stop takes the fast path, except the platform's SIGTERM after its own notice: that is
    the same preemption, and the emergency checkpoint already under way keeps the notice's deadline."""
    stop = led.stop
    if stop is None:
        return False
    if stop.notice is not None and not stop.signalled:
        stop.signalled = True
        led.log("info", "notices", f"{name} after the {stop.reason}: the same preemption; "
                "the emergency checkpoint under way goes on (a second signal forces the stop)")
        return False
    return True


def emergency_committed(led: Ledger, step: Any, at: float) -> None:
    """The stop's emergency checkpoint is durable: reported by a trainer, or seen on disk by a rescan
    (a launcher's exit code can hide the ranks' 85, and a trainer may die before it reports)."""
    stop = led.stop
    if stop is None:
        return
    stop.confirmed = True
    if stop.committed_at is None:
        stop.committed_at, stop.committed_step = at, step
    acknowledge(led)  # the checkpoint is durable: the platform may go ahead


def acknowledge(led: Ledger, event_id: str | None = None) -> None:
    """Let the platform go ahead (Azure StartRequests): the stop's events, or one event."""
    stop = led.stop
    ids = [event_id] if event_id else [i for i in (
        [stop.notice.event_id if stop and stop.notice else None] + led.pending_acks) if i]
    for i in ids:
        if stop is not None and i in stop.acked:
            continue
        if stop is not None:
            stop.acked.add(i)
        led.emit(act.Acknowledge(i))


def on_notice(led: Ledger, view: act.View, notice: Notice) -> None:
    fields = notice.fields()
    if notice.withdrawn:
        led.event("info", "notice_withdrawn", f"{notice.source}: {notice.detail}; training goes on", **fields)
        return
    lead = f", deadline in {notice.deadline - view.wall:.1f} s" if notice.deadline is not None else ""
    todo = {"stop": "emergency checkpoint, then stop", "checkpoint": "checkpoint and keep training",
            "log": "nothing to do"}[notice.action]
    led.event("warning" if notice.action != "log" else "info", "notice",
              f"{notice.source} {notice.kind} notice: {notice.detail}{lead}; {todo}",
              state=led.sm.state.value, **fields)
    if notice.action == "stop":
        if led.stop is not None:  # a second notice, or a notice after SIGTERM: one emergency checkpoint
            led.log("info", "notices", f"a stop is already under way ({led.stop.reason}): "
                    "one emergency checkpoint, not two")
            if notice.event_id and (led.stop.committed_at is not None or led.sm.terminal):
                acknowledge(led, notice.event_id)
            elif notice.event_id:
                led.pending_acks.append(notice.event_id)
            return
        led.notice = {**fields, "pending": True}
        request_stop(led, view, f"{notice.source} {notice.kind} notice", notice=notice)
        led.save_state()
    elif notice.action == "checkpoint":
        led.notice = {**fields, "pending": True}
        request_id = led.request_save(view, f"the {notice.source} {notice.kind} notice", hurry=True)
        if request_id is None:
            acknowledge(led, notice.event_id)
        elif notice.event_id:
            led.notice_saves[request_id] = notice.event_id
        led.save_state()


def after_stop(led: Ledger, code: int) -> None:
    """The run ends after a stop: journal how the notice went, acknowledge it, requeue under SLURM."""
    stop = led.stop
    assert stop is not None
    notice = stop.notice
    if notice is not None:
        committed = code == exitcodes.PREEMPTED
        at = stop.committed_at
        if committed and at is None and led.last_checkpoint and led.last_checkpoint.get("kind") == "emergency":
            at = led.last_checkpoint.get("time")
        margin = round(notice.deadline - at, 3) if committed and at is not None and notice.deadline else None
        result: dict[str, Any] = {"committed": committed, "committed_at": at, "step": stop.committed_step,
                  "margin_seconds": margin, "before_deadline": None if margin is None else margin >= 0,
                  "no_checkpoint": stop.no_checkpoint, "exit_code": code}
        led.event("info" if committed else "warning", "notice_result",
                  f"{notice.source} {notice.kind} notice: " + (
                      f"emergency checkpoint committed {margin:.1f} s before the deadline" if margin is not None
                      else "emergency checkpoint committed" if committed
                      else "no emergency checkpoint; the last committed one stays"),
                  source=notice.source, kind=notice.kind, received=notice.received, deadline=notice.deadline,
                  lead_seconds=notice.lead, **result)
        if led.notice is not None:
            led.notice.update(pending=False, **result)
    acknowledge(led)
    if led.cfg.slurm.requeue and code == exitcodes.PREEMPTED and stop.reason != "ckptd stop" and not stop.joined:
        led.emit(act.Requeue())


def judge_stopped_exit(led: Ledger, life: Life, status: ExitStatus, preempted: bool) -> None:
    """The child exited during a stop. Judged by the checkpoint, not only by the exit code: torchrun exits 1
    when its ranks exit 85 or 86 (outside `ckptd run`, or a rank whose stop went wrong)."""
    assert led.stop is not None
    confirmed = preempted or led.stop.confirmed
    end(led, S.EXITED, exitcodes.PREEMPTED if confirmed else exitcodes.STOPPED_NO_CHECKPOINT,
        "stopped with an emergency checkpoint" if confirmed else _why_no_checkpoint(led, life, status))


def _why_no_checkpoint(led: Ledger, life: Life, status: ExitStatus) -> str:
    if led.stop is not None and led.stop.no_checkpoint:
        return f"stopped without an emergency checkpoint: {led.stop.no_checkpoint}"
    if not life.connected:
        return ("stopped; no emergency checkpoint: the script never connected to ckptd "
                "(it does not use ckptd.Checkpointer, or it had not created one yet)")
    if not life.stepped:
        return "stopped before the trainer reached its first step; there was nothing to checkpoint"
    if life.we_killed:
        return f"stopped; the grace period ({led.cfg.grace:g} s) ran out before an emergency checkpoint " \
               "was confirmed"
    return f"stopped; the trainer ended ({status.describe()}) without confirming an emergency checkpoint"


def finish(led: Ledger, linger: float) -> None:
    """The supervisor shuts down: answer whoever still waits (``ckptd stop --wait``, ``ckptd save --wait``)."""
    if led.stop is not None:
        for peer in led.stop.waiters:
            led.send(peer, protocol.STOPPED, exit_code=led.exit_code, linger=linger)
    for waiters in led.saves.values():
        for peer in waiters:
            led.send(peer, protocol.SAVE_FAILED, error="the run ended before the checkpoint")
