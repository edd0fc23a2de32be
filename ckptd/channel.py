"""Trainer side of the control channel (see :mod:`ckptd.protocol`).

A daemon thread reads requests from the supervisor while the training loop is
busy (even inside a long step) and records them; ``Checkpointer.step()`` takes
them at the next safe point. Sending never blocks training for long: a broken
or slow supervisor makes the channel close itself, and training goes on.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import protocol, store

log = logging.getLogger("ckptd")

SEND_TIMEOUT = 2.0  # a supervisor that stops reading for this long is dropped; never applies to reads
# The signal on which a trainer under `ckptd run` dumps every thread's Python stack (faulthandler) into
# a file the supervisor reads when it declares a hang. A real-time signal: scripts and launchers do not
# use it, and faulthandler's C-level handler works while the main thread is stuck in C code.
STACK_SIGNAL = signal.SIGRTMIN + 7 if hasattr(signal, "SIGRTMIN") else None


@dataclass
class Requests:
    """Requests received since the last :meth:`TrainerChannel.take`."""

    save_ids: list[str] = field(default_factory=list)
    save_waited: bool = False  # somebody waits for the save (``ckptd save --wait``): no pacing
    stop_id: str | None = None
    stop_deadline: float | None = None
    stop_reason: str = ""

    @property
    def save(self) -> bool:
        return bool(self.save_ids)

    @property
    def stop(self) -> bool:
        return self.stop_id is not None


class TrainerChannel:
    def __init__(self, path: str, *, rank: int = 0, restart_count: int = 0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending = Requests()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(5.0)
        self._sock.connect(path)
        # Blocking from here on, for both directions. The send bound is the kernel's SO_SNDTIMEO, which
        # applies to sends only: a Python-level timeout (settimeout) would also end the reader's recv()
        # after that many seconds of silence from the supervisor, and drop a healthy channel.
        self._sock.settimeout(None)
        secs = int(SEND_TIMEOUT)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                              struct.pack("ll", secs, int((SEND_TIMEOUT - secs) * 1e6)))
        stack_file = _arm_stack_dump(path)
        stack_signal = int(STACK_SIGNAL) if stack_file and STACK_SIGNAL is not None else None  # armed: both set
        self.send(protocol.HELLO, role="trainer", pid=os.getpid(), rank=rank, restart_count=restart_count,
                  stack_signal=stack_signal, stack_file=stack_file)
        self._reader = threading.Thread(target=self._read_loop, name="ckptd-control", daemon=True)
        self._reader.start()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, type_: str, **fields: Any) -> None:
        sock = self._sock
        if sock is None:
            return
        data = protocol.encode({"type": type_, **fields})
        with self._send_lock:
            try:
                sock.sendall(data)  # bounded by SO_SNDTIMEO: a supervisor that stops reading cannot stall training
            except OSError as exc:
                log.warning("ckptd: control channel to %s lost (%s); training continues without it", self.path, exc)
                self._drop()

    def take(self) -> Requests:
        """Return and clear the requests received so far (cheap; called every step)."""
        with self._lock:
            got, self._pending = self._pending, Requests()
        return got

    def peek_stop(self) -> Requests:
        with self._lock:
            return self._pending

    def _read_loop(self) -> None:
        decoder = protocol.LineDecoder()
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                messages = decoder.feed(data)
            except (ValueError, RecursionError) as exc:
                log.warning("ckptd: bad control message (%s); closing the channel", exc)
                break
            with self._lock:  # what arrived together is taken together: two requests, one save
                for msg in messages:
                    self._record(msg)
        self._drop()

    def _record(self, msg: dict[str, Any]) -> None:
        """Note one request (called with ``_lock`` held)."""
        kind = msg.get("type")
        if kind == protocol.SAVE:
            self._pending.save_ids.append(str(msg.get("request_id", "")))
            self._pending.save_waited = self._pending.save_waited or bool(msg.get("wait"))
        elif kind == protocol.STOP:
            self._pending.stop_id = str(msg.get("request_id", ""))
            deadline = msg.get("deadline")
            self._pending.stop_deadline = float(deadline) if deadline is not None else None
            self._pending.stop_reason = str(msg.get("reason", ""))

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # shutdown() first: while the reader thread sits in recv() the kernel keeps the socket open past
            # close(), so the supervisor would see no end and go on watching a closed trainer for hangs
            # (a slow interpreter exit after ck.close() was then killed as a hang and restarted).
            for end in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
                try:
                    end()
                except OSError:
                    pass

    def close(self) -> None:
        self._drop()


def _arm_stack_dump(socket_path: str) -> str | None:
    """Have faulthandler write every thread's stack to a per-process file on STACK_SIGNAL.

    The file lives beside the control socket (the run's private directory); the supervisor reads it
    when it declares this process hung. Returns its path, or None when it could not be armed (another
    handler owns the signal, no real-time signals, not the main interpreter).
    """
    if STACK_SIGNAL is None:
        return None
    try:
        if signal.getsignal(STACK_SIGNAL) not in (signal.SIG_DFL, None):
            return None  # the script uses this signal itself
        path = os.path.join(os.path.dirname(socket_path), f"stacks-{os.getpid()}.txt")
        # relative to the run's private directory, checked on its descriptor (store.open_at): never a link
        fd = store.open_at(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, check=store.private_dir)
        f = os.fdopen(fd, "w")
        faulthandler.register(STACK_SIGNAL, file=f, all_threads=True, chain=False)
        _STACK_FILES.append(f)  # faulthandler keeps only the fd: the file object must stay open
        return path
    except (OSError, ValueError, RuntimeError) as exc:
        log.debug("ckptd: stack dumps on hang not available: %s", exc)
        return None


_STACK_FILES: list[Any] = []


def connect_from_env(path: str | None, *, rank: int, restart_count: int) -> TrainerChannel | None:
    """Connect when ``ckptd run`` gave us a socket; warn and go on without one if it fails."""
    if not path:
        return None
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return TrainerChannel(path, rank=rank, restart_count=restart_count)
        except OSError as exc:
            if time.monotonic() > deadline:
                log.warning("ckptd: cannot reach the supervisor at %s (%s); running without control channel", path, exc)
                return None
            time.sleep(0.05)
