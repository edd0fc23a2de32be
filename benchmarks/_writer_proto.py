"""Prototype background writers for the thread-vs-process experiment.

A shared-memory buffer (multiprocessing.shared_memory) holds the snapshot; a
writer persists it to a file with write() + fsync(), optionally hashing each
chunk with xxh3-128 (what a checksummed store does). The writer runs either in
a thread of the training process or in a separate, pre-started process.

No torch import here: the spawned writer process starts fast and small.
"""

from __future__ import annotations

import os
import threading
from multiprocessing import shared_memory
from typing import Any

CHUNK = 8 << 20


def persist(buf: memoryview, nbytes: int, path: str, do_hash: bool, chunk: int = CHUNK) -> str:
    """do_hash: False, True (xxh3-128 inline) or "direct" (O_DIRECT, 64 MiB requests, no page cache)."""
    if do_hash == "direct":
        return persist_direct(buf, nbytes, path)
    h = None
    if do_hash:
        import xxhash

        h = xxhash.xxh3_128()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < nbytes:
            piece = buf[off : min(nbytes, off + chunk)]
            if h is not None:
                h.update(piece)
            done = 0
            while done < len(piece):
                done += os.write(fd, piece[done:])
            off += len(piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_parent(path)
    return h.hexdigest() if h is not None else ""


def fsync_parent(path: str) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def persist_direct(buf: memoryview, nbytes: int, path: str, chunk: int = 64 << 20) -> str:
    """O_DIRECT writes of the page-aligned buffer; the unaligned tail through a buffered fd."""
    aligned = nbytes - nbytes % 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        off = 0
        while off < aligned:
            off += os.write(fd, buf[off : min(aligned, off + chunk)])
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        if aligned < nbytes:
            os.pwrite(fd, buf[aligned:nbytes], aligned)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_parent(path)
    return ""


class ThreadWriter:
    def __init__(self, shm_name: str) -> None:
        self.shm = shared_memory.SharedMemory(name=shm_name)
        self.thread: threading.Thread | None = None

    def start(self, nbytes: int, path: str, do_hash: bool) -> None:
        self.thread = threading.Thread(target=persist, args=(self.shm.buf, nbytes, path, do_hash), daemon=True)
        self.thread.start()

    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def close(self) -> None:
        self.wait()
        self.shm.close()


def _process_main(conn: Any, shm_name: str) -> None:
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            nbytes, path, do_hash = msg
            conn.send(persist(shm.buf, nbytes, path, do_hash))
    finally:
        shm.close()


class ProcessWriter:
    """A writer process started once (spawn), fed over a pipe; the buffer is shared memory."""

    def __init__(self, shm_name: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_process_main, args=(child, shm_name), daemon=True)
        self.proc.start()
        self.busy = False

    def start(self, nbytes: int, path: str, do_hash: bool) -> None:
        self.conn.send((nbytes, path, do_hash))
        self.busy = True

    def in_flight(self) -> bool:
        if self.busy and self.conn.poll():
            self.conn.recv()
            self.busy = False
        return self.busy

    def wait(self) -> None:
        if self.busy:
            self.conn.recv()
            self.busy = False

    def close(self) -> None:
        self.wait()
        self.conn.send(None)
        self.proc.join(10)
