"""The control channel: newline-delimited JSON over a unix stream socket.

The supervisor listens on ``<root>/.ckptd/control.sock`` (or the path in
``CKPTD_CONTROL``); trainers and CLI clients connect. The socket file is
mode 0600 inside a 0700 directory, so only the run's owner can reach it.

Every message is one JSON object on one line with a ``type`` key. The first
message on a connection is ``hello`` with ``role`` = ``trainer`` or ``client``.

Trainer -> supervisor
    hello      {role: "trainer", pid, rank, restart_count}
    restored   {step, path, seconds}          after ``Checkpointer.restore()`` (``seconds`` it took)
    heartbeat  {step, time, metrics}          from every ``Checkpointer.step()`` (rate-limited to 1/s);
                                              ``metrics``: the numbers last given to ``step()`` (absent
                                              when ``CKPTD_METRICS=0``)
    saved      {step, path, kind, request_id, bytes, seconds, paused_seconds, stall_seconds, replaced}
                                              a checkpoint was committed (``seconds``: snapshot + persist;
                                              ``replaced``: it replaced the checkpoint of its step, close())
    save_failed{step, kind, request_id, error, errno}
    pruning    {names}                        the trainer's own retention is about to delete these checkpoints
    stopping   {step, exit_code, reason}      the trainer is about to exit after a stop request; ``reason``
                                              (exit 86) says why no emergency checkpoint was written
    warning    {event, message, step, ...}    something the run should know: ``step_jump`` (the first step
                                              after a resume skipped steps; ``restored_step``), ``stop_wait``
                                              (a stop waits for a safe point; ``seconds``, ``where``, and
                                              ``reached`` once it got there)

Supervisor -> trainer
    save       {request_id, kind, wait}       checkpoint at the next safe point, keep training; with
                                              ``wait`` somebody waits for it: persist at full speed
    stop       {request_id, deadline, reason} emergency checkpoint at the next safe point, then exit
                                              with ``exitcodes.PREEMPTED``; ``deadline`` is unix time

Client -> supervisor (``ckptd save|stop|status``) and replies
    save       {wait}     -> accepted {request_id}; with wait, then saved/save_failed
    stop       {wait}     -> accepted {request_id}; with wait, then stopped {exit_code, linger}
                          (``linger``: seconds `ckptd run` still serves its final metrics before it exits)
    status     {}         -> status {...}

Nothing here imports torch: the supervisor uses this module too.
"""

from __future__ import annotations

import json
import os
from typing import Any

RUN_DIR_NAME = ".ckptd"
SOCKET_NAME = "control.sock"
MAX_LINE = 1 << 20  # a peer sending a longer line is disconnected

HELLO = "hello"
RESTORED = "restored"
HEARTBEAT = "heartbeat"
SAVED = "saved"
SAVE_FAILED = "save_failed"
STOPPING = "stopping"
PRUNING = "pruning"
WARNING = "warning"
TRAINER_WARNINGS = ("step_jump", "stop_wait")
SAVE = "save"
STOP = "stop"
STATUS = "status"
ACCEPTED = "accepted"
STOPPED = "stopped"
ERROR = "error"


def run_dir(root: str) -> str:
    """Where the supervisor keeps its lock, socket, journal and state for ``root``."""
    return os.path.join(root, RUN_DIR_NAME)


def default_socket_path(node_dir: str) -> str:
    """The control socket in a run directory (``run_dir(root)``, or a node's: supervisor/rundir.py)."""
    return os.path.join(node_dir, SOCKET_NAME)


def encode(msg: dict[str, Any]) -> bytes:
    if "type" not in msg:
        raise ValueError("control message without a type")
    return (json.dumps(msg, separators=(",", ":"), allow_nan=False) + "\n").encode()


class LineDecoder:
    """Accumulates bytes from a stream and yields complete JSON messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    raise ValueError("control message longer than 1 MiB")
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if not line.strip():
                continue
            msg = json.loads(line)
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ValueError("control message is not an object with a type")
            out.append(msg)
