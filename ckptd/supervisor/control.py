"""Control socket server: JSON lines over a unix stream socket, serviced by the loop's selector.

Many peers at once: every trainer rank (torchrun ranks inherit ``CKPTD_CONTROL``) and CLI clients.
Only the owner may connect: the socket is 0600 in a 0700 directory, and each peer's uid is checked
with ``SO_PEERCRED``. Nothing here blocks: writes are buffered and finished when the socket is writable.

Timeouts, and what they never apply to: a trainer's connection lives as long as the trainer, however
quiet (a long step sends nothing). A peer that has not said ``hello`` within HELLO_TIMEOUT, and a
client that sits idle for CLIENT_IDLE while nothing is owed to it (``waiting``), are dropped; at most
MAX_CLIENTS non-trainer peers are held (the longest idle one makes room for a new one). When ``accept`` fails
(EMFILE: out of file descriptors) the listener pauses for ACCEPT_PAUSE instead of spinning, and everything
already connected carries on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import protocol, store

HELLO_TIMEOUT = 10.0  # seconds a new connection may take to say who it is
CLIENT_IDLE = 60.0  # seconds a client may idle while no reply is owed to it
MAX_CLIENTS = 256  # connections that are not trainers
ACCEPT_PAUSE = 1.0  # seconds the listener rests after accept() failed (EMFILE, ENFILE, ENOMEM)


@dataclass(eq=False)
class Peer:
    id: int
    sock: socket.socket
    peer_pid: int
    last_seen: float
    role: str | None = None  # "trainer" | "client" after hello
    pid: int | None = None
    rank: int | None = None
    decoder: protocol.LineDecoder = field(default_factory=protocol.LineDecoder)
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # close once ``out`` is flushed
    waiting: bool = False  # a client owed a reply (save --wait, stop --wait): never dropped as idle
    stack_signal: int | None = None  # trainer: dumps its threads' stacks to ``stack_file`` on this signal
    stack_file: str | None = None


class ControlServer:
    def __init__(self, path: str, selector: selectors.BaseSelector, clock,
                 on_message: Callable[[Peer, dict[str, Any]], None], on_close: Callable[[Peer], None],
                 log: Callable[..., None]) -> None:
        self.path = path
        self._sel = selector
        self._clock = clock
        self._on_message = on_message
        self._on_close = on_close
        self._log = log
        self._ids = itertools.count(1)
        self.peers: dict[int, Peer] = {}
        self._listener: socket.socket | None = None
        self._paused_until: float | None = None  # accept() failed: the listener rests until then
        self.refused = 0  # connections refused or dropped for limits (logged once per burst)

    def open(self) -> None:
        # stale: we hold the run lock, so no live supervisor owns it; removed relative to the checked run
        # directory (never into one swapped for a link or for another account's directory)
        store.unlink_at(self.path, check=store.private_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no chmod by path afterwards (it would follow a link)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._accept)

    def trainers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == "trainer"]

    def next_due(self) -> float | None:
        """When :meth:`expire` next has work (monotonic), for the loop's select timeout."""
        times = [self._paused_until] if self._paused_until is not None else []
        for p in self.peers.values():
            if p.role is None:
                times.append(p.last_seen + HELLO_TIMEOUT)
            elif p.role == "client" and not p.waiting:
                times.append(p.last_seen + CLIENT_IDLE)
        return min(times) if times else None

    def expire(self) -> None:
        """Drop peers that never said hello or idle clients; resume a paused listener."""
        now = self._clock.monotonic()
        if self._paused_until is not None and now >= self._paused_until and self._listener is not None:
            self._paused_until = None
            self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        for p in list(self.peers.values()):
            silent = now - p.last_seen
            if (p.role is None and silent >= HELLO_TIMEOUT) or (
                    p.role == "client" and not p.waiting and silent >= CLIENT_IDLE):
                self._drop(p)

    def send(self, peer: Peer, type_: str, **fields: Any) -> None:
        if peer.id not in self.peers:
            return
        peer.out += protocol.encode({"type": type_, **fields})
        self._write(peer)

    def close_after_flush(self, peer: Peer) -> None:
        peer.closing = True
        self._write(peer)

    def flush(self, deadline: float) -> None:
        """Best effort: push pending replies before the supervisor exits."""
        import select

        for peer in list(self.peers.values()):
            while peer.out and peer.id in self.peers and self._clock.monotonic() < deadline:
                select.select([], [peer.sock], [], max(0.0, deadline - self._clock.monotonic()))
                self._write(peer)

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self._drop(peer, notify=False)
        if self._listener is not None:
            if self._paused_until is None:  # a paused listener (accept failed: EMFILE) is not registered
                self._sel.unregister(self._listener)
            self._paused_until = None
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                store.unlink_at(self.path, check=store.private_dir)

    # --- selector callbacks ---------------------------------------------------------------------

    def _accept(self, mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM, ENOBUFS: rest instead of spinning on a ready listener
                self._sel.unregister(self._listener)
                self._paused_until = self._clock.monotonic() + ACCEPT_PAUSE
                self._log("warning", "control", f"cannot accept control connections ({exc.strerror or exc}); "
                                                f"pausing {ACCEPT_PAUSE:g} s, {len(self.peers)} connections open")
                return
            clients = [p for p in self.peers.values() if p.role != "trainer"]
            if len(clients) >= MAX_CLIENTS:
                # Make room by dropping the longest-idle client nobody owes a reply, so a flood of idle
                # connections cannot lock out `ckptd status`; refuse only when every one is owed a reply.
                idle = [p for p in clients if not p.waiting]
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    self._log("warning", "control", f"{MAX_CLIENTS} client connections are open: dropping the "
                                                    f"longest idle ({self.refused} so far)")
                if not idle:
                    sock.close()
                    continue
                self._drop(min(idle, key=lambda p: p.last_seen))
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            if uid != os.getuid():
                self._log("warning", "control", f"refused a control connection from uid {uid} (pid {pid}): "
                                                f"only uid {os.getuid()} may control this run")
                sock.close()
                continue
            sock.setblocking(False)
            peer = Peer(next(self._ids), sock, pid, self._clock.monotonic())
            self.peers[peer.id] = peer
            self._sel.register(sock, selectors.EVENT_READ, lambda m, p=peer: self._ready(p, m))

    def _ready(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(peer)
        if mask & selectors.EVENT_READ and peer.id in self.peers:
            self._read(peer)

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        peer.last_seen = self._clock.monotonic()
        try:
            messages = peer.decoder.feed(data)
        except (ValueError, RecursionError) as exc:
            self._log("warning", "control", f"dropped control peer pid {peer.peer_pid}: {exc}")
            self._drop(peer)
            return
        for msg in messages:
            if msg["type"] == protocol.HELLO and peer.role is None:
                peer.role = "trainer" if msg.get("role") == "trainer" else "client"
                # The kernel's word for the pid; a trainer may name itself only within its own process.
                peer.pid = peer.peer_pid or _int_or_none(msg.get("pid"))
                peer.rank = _int_or_none(msg.get("rank"))
                peer.stack_signal = _int_or_none(msg.get("stack_signal"))
                stack_file = msg.get("stack_file")
                peer.stack_file = stack_file if isinstance(stack_file, str) else None
            elif peer.role is None:
                peer.role = "client"  # a client may skip hello
            if peer.id not in self.peers:
                return
            self._on_message(peer, msg)

    def _write(self, peer: Peer) -> None:
        if peer.id not in self.peers:
            return
        while peer.out:
            try:
                sent = peer.sock.send(peer.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(peer)
                return
            del peer.out[:sent]
        if not peer.out and peer.closing:
            self._drop(peer)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0)
        if self._sel.get_key(peer.sock).events != events:
            self._sel.modify(peer.sock, events, self._sel.get_key(peer.sock).data)

    def _drop(self, peer: Peer, notify: bool = True) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        try:
            self._sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        if notify:
            self._on_close(peer)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
