"""What the supervisor does with each control-channel message (protocol.py): from trainers and from clients.

One function per (role, type); :func:`handle` dispatches. Pure: they change the
:class:`~ckptd.supervisor.ledger.Ledger` and append actions (a reply, a journal record, a metric).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import exitcodes, protocol
from . import actions as act
from . import stopping
from .control import Peer
from .ledger import Ledger, ckpt_record, fmt
from .policy import is_step
from .states import ChildState

S = ChildState
MAX_PRUNING = 1024  # names of one `pruning` message looked at


def handle(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    handler = HANDLERS.get((peer.role or "", msg["type"]))
    if handler is None:
        if msg["type"] != protocol.HELLO:
            led.send(peer, protocol.ERROR, error=f"unexpected {msg['type']!r} from a {peer.role}")
        return
    handler(led, view, peer, msg)


def request_ids(msg: dict[str, Any]) -> list[str]:
    ids = msg.get("request_ids")
    if isinstance(ids, list):
        return [str(i) for i in ids if i]
    return [i for i in str(msg.get("request_id") or "").split(",") if i]  # older trainers joined them with ","


# --- trainers -------------------------------------------------------------------------------------


def _trainer_hello(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    led.log("info", "trainer", f"trainer pid {peer.pid} (rank {fmt(peer.rank)}) connected")
    led.trainer_seen = True
    if led.life is not None:
        led.life.connected = True
        led.metric("trainer_connected")
    if led.sm.state is S.STOPPING and led.stop is not None and not (led.life and led.life.hang):
        led.send(peer, protocol.STOP, request_id=led.stop.request_id, deadline=led.stop.deadline_wall,
                 reason=led.stop.reason)


def _trainer_heartbeat(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    led.saw_step(msg.get("step"), completed=True)
    led.metric("train_metrics", msg.get("metrics"))


def _trainer_restored(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    step: Any = msg.get("step")
    led.saw_step(step)
    led.metric("restored", step, msg.get("seconds"))
    if msg.get("path"):
        led.resumed_from = os.path.basename(str(msg["path"]).rstrip("/"))
    # Journal the life's first report only: every rank restores the step the job agreed on, and the first
    # is as good as any (peer.rank is the global rank: on node K > 0 of a multi-node job no rank 0 reports).
    if led.restore_reported:
        return
    led.restore_reported = True
    expected, led.expected_resume = led.expected_resume, None
    more = expected - step if is_step(step) and expected is not None and step < expected else 0
    said = f"trainer restored step {fmt(step)} from {msg.get('path')}"
    extra: dict[str, Any] = {}
    if more:  # the newest checkpoint did not verify (quarantined); RunMetrics._on_resumed counts the steps
        said += f", not step {expected}: the newer checkpoint did not verify ({more} more steps lost)"
        extra = {"expected_step": expected, "more_lost_steps": more}
    led.event("warning" if more else "info", "resumed", said, step=step, path=msg.get("path"),
              restart_count=led.restarts, seconds=msg.get("seconds"), **extra)


def _trainer_saved(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    step, path, kind = msg.get("step"), str(msg.get("path") or ""), msg.get("kind")
    led.saw_step(step, completed=True)
    name = os.path.basename(path.rstrip("/"))
    led.metric("saved", msg, name)
    if kind == "emergency":
        stopping.emergency_committed(led, step, view.wall)
    ids = request_ids(msg)
    for request_id in ids:
        stopping.acknowledge(led, led.notice_saves.pop(request_id, None))
    if led.person_saves & set(ids):
        led.person_saves.difference_update(ids)
        led.emit(act.Pin(name))
    led.last_checkpoint = ckpt_record(name, step, kind, view.wall)
    record = act.Record("info", "checkpoint", f"checkpoint committed: {name} (step {fmt(step)}, {kind})",
                        {"name": name, "step": step, "kind": kind, "path": path, "bytes": msg.get("bytes"),
                         "seconds": msg.get("seconds"), "paused_seconds": msg.get("paused_seconds"),
                         "request_id": msg.get("request_id")})
    led.emit(act.Committed(name, record, replaced=msg.get("replaced") is True))
    _answer_waiters(led, msg, protocol.SAVED)


def _trainer_pruning(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    names = msg.get("names")
    if not isinstance(names, list):
        return
    led.emit(act.Prune(tuple(n for n in names[:MAX_PRUNING] if isinstance(n, str) and 0 < len(n) <= 255)))


def _trainer_save_failed(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    led.event("error", "save_failed", f"checkpoint failed in the trainer: {msg.get('error')}",
              step=msg.get("step"), kind=msg.get("kind"), error=msg.get("error"), errno=msg.get("errno"))
    for request_id in request_ids(msg):
        stopping.acknowledge(led, led.notice_saves.pop(request_id, None))
    _answer_waiters(led, msg, protocol.SAVE_FAILED)


def _answer_waiters(led: Ledger, msg: dict[str, Any], reply: str) -> None:
    """One save can answer several requests (they merge when they reach the trainer in the same step)."""
    fields = {k: v for k, v in msg.items() if k not in ("type", "request_ids")}
    for request_id in request_ids(msg):
        for waiter in led.saves.pop(request_id, []):
            led.reply_and_close(waiter, reply, **{**fields, "request_id": request_id})


def _trainer_warning(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    """A trainer's report (protocol.TRAINER_WARNINGS): logged (escaped by the log) and journaled, every field
    bounded."""
    event = msg.get("event")
    if event not in protocol.TRAINER_WARNINGS:
        return
    fields: dict[str, Any] = {"pid": peer.pid}
    for key in ("step", "restored_step"):
        if is_step(msg.get(key)):
            fields[key] = msg[key]
    seconds = msg.get("seconds")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < 1e9:
        fields["seconds"] = float(seconds)
    if msg.get("reached") is True:
        fields["reached"] = True
    if isinstance(msg.get("where"), str):
        fields["where"] = msg["where"][:500]
    text = (msg["message"] if isinstance(msg.get("message"), str) else event)[:1000]  # the log escapes it
    led.event("warning", str(event), f"trainer pid {peer.pid}: {text}", **fields)


def _trainer_stopping(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    led.saw_step(msg.get("step"))
    code = msg.get("exit_code")  # the stop's outcome (a rank of torchrun under us exits 0 for 85)
    if code == exitcodes.PREEMPTED and led.life is not None:
        led.life.stopped_with_checkpoint = True
    led.log("info", "stopping", f"trainer pid {peer.pid} stops at step {fmt(msg.get('step'))}: "
            + ("emergency checkpoint committed" if code == exitcodes.PREEMPTED else f"outcome {fmt(code)}"))
    if led.stop is None and led.sm.state is S.RUNNING:
        stopping.join_stop(led, view, peer, msg)
    reason = msg.get("reason")
    if isinstance(reason, str) and reason and led.stop is not None and led.stop.no_checkpoint is None:
        led.stop.no_checkpoint = reason[:2000]
        led.event("warning", "emergency_skipped", f"trainer pid {peer.pid}: {led.stop.no_checkpoint}",
                  pid=peer.pid, step=msg.get("step"), reason=led.stop.no_checkpoint)


# --- clients (ckptd save / stop / status) ---------------------------------------------------------


def _client_save(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    wait = bool(msg.get("wait"))
    request_id = led.request_save(view, "ckptd save", waiter=peer if wait else None)
    led.person_saves.add(request_id or "")
    if request_id is None:
        led.send(peer, protocol.ERROR, close=True, error="no trainer is connected: the script does not use "
                 "ckptd.Checkpointer, or it is between restarts", code=exitcodes.FAILURE)
        return
    led.send(peer, protocol.ACCEPTED, close=not wait, request_id=request_id)


def _client_stop(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    wait = bool(msg.get("wait"))
    request_id = stopping.request_stop(led, view, "ckptd stop", waiter=peer if wait else None)
    led.send(peer, protocol.ACCEPTED, close=not wait, request_id=request_id)


def _client_status(led: Ledger, view: act.View, peer: Peer, msg: dict[str, Any]) -> None:
    led.emit(act.SendStatus(peer))


Handler = Callable[[Ledger, act.View, Peer, dict[str, Any]], None]
HANDLERS: dict[tuple[str, str], Handler] = {
    ("trainer", protocol.HELLO): _trainer_hello,
    ("trainer", protocol.HEARTBEAT): _trainer_heartbeat,
    ("trainer", protocol.RESTORED): _trainer_restored,
    ("trainer", protocol.SAVED): _trainer_saved,
    ("trainer", protocol.PRUNING): _trainer_pruning,
    ("trainer", protocol.SAVE_FAILED): _trainer_save_failed,
    ("trainer", protocol.WARNING): _trainer_warning,
    ("trainer", protocol.STOPPING): _trainer_stopping,
    ("client", protocol.SAVE): _client_save,
    ("client", protocol.STOP): _client_stop,
    ("client", protocol.STATUS): _client_status,
}
