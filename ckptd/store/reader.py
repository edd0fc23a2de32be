"""The restore read engine: one stream of ``preadv`` requests into the caller's buffers, hashed behind it.

:func:`read_into` reads a checkpoint's tensor data in place (restore's live tensors, the snapshot buffer),
:class:`Prefetch` starts the disk while restore plans. While :func:`read_into` runs the caller's ``during()``
it lowers the interpreter's switch interval, process-wide, so the reading threads get the GIL back
promptly. That belongs to a trainer's restore alone: ``ckptd.store`` loads this module only when one of its
names is first used, so the supervisor, which imports the store to list and verify checkpoints, never
loads it (tests/test_store_package.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import CorruptCheckpointError

READ_CHUNK = 16 << 20  # restore read request: small enough that hashing the last one adds little after the read ends
FIRST_READ = 2 << 20  # the first restore read request (see read_into)
READERS = 1  # restore read requests in flight: one stream, hashed behind it (docs/performance.md, P3)
RESTORE_PREFETCH = 32 << 20  # restore starts the disk on this much while it plans (store.Prefetch)
PREFETCH_PIECE = 4 << 20  # Prefetch's request: it stops within one of these once the real read starts
DURING_SWITCH = 0.0002  # seconds: the interpreter's switch interval while read_into's during() runs
MAX_IOV = 512  # buffers per preadv (IOV_MAX is 1024 on Linux)


def read_into(fd: int, offset: int, views: Iterable[memoryview], h: Any, path: str,
              ready: Callable[[int], None] | None = None, during: Callable[[], None] | None = None) -> int:
    """Fill ``views`` in order from the file's bytes at ``offset``; update ``h`` with them in order.
    ``ready(end)``, when given, is called before each read request with the file offset the request
    ends at (restore keeps an undo log of what a request will overwrite). ``during()``, when given,
    runs in this thread once the first request is in flight (restore reads its state.json meanwhile);
    what it raises stops the reading (requests in flight finish first) and is raised.

    Straight into the callers' buffers (tensors), no second copy. READERS requests of ~READ_CHUNK
    bytes each (``preadv``, scattering into several small tensors at once) are in flight, issued in
    file order; this thread hashes each one as soon as it and all before it are in. One request in
    flight: beside restore's undo-log copy, two were 60-100 ms slower per 256 MiB (docs/performance.md,
    "Restore: read in place with an undo log"). Returns the
    offset after the last byte read; a file that ends early raises CorruptCheckpointError.
    """
    groups: list[tuple[int, list[memoryview]]] = []
    pos, bufs, size = offset, [], 0
    limit = FIRST_READ  # the first request is small: it waits for its undo-log copy before it can start
    for mv in views:
        start = 0
        while start < len(mv):
            piece = mv[start : start + limit - size]  # limit <= READ_CHUNK
            start += len(piece)
            bufs.append(piece)
            size += len(piece)
            if size >= limit or len(bufs) >= MAX_IOV:
                groups.append((pos, bufs))
                pos, bufs, size, limit = pos + size, [], 0, READ_CHUNK
    if bufs:
        groups.append((pos, bufs))
        pos += size
    if not groups:
        if during is not None:
            during()
        return pos

    started = threading.Event()

    def read_group(off: int, pieces: list[memoryview]) -> None:
        started.set()
        want = sum(len(b) for b in pieces)
        if ready is not None:
            ready(off + want)
        got = 0
        while got < want:
            rest, skip = [], got
            for b in pieces:  # what is still unread after a short read
                if skip >= len(b):
                    skip -= len(b)
                else:
                    rest.append(b[skip:])
                    skip = 0
            n = os.preadv(fd, rest, off + got)
            if n == 0:
                raise CorruptCheckpointError(path, f"{os.path.basename(path)} ends early (truncated)")
            got += n

    with ThreadPoolExecutor(min(READERS, len(groups)), thread_name_prefix="ckptd-read") as pool:
        futures = [pool.submit(read_group, off, pieces) for off, pieces in groups]
        try:
            if during is not None:
                started.wait()  # the reader runs before this thread takes the interpreter
                with _short_switch():  # and the reading threads get it back promptly
                    during()
            for fut, (_, pieces) in zip(futures, groups, strict=True):
                fut.result()
                for b in pieces:
                    h.update(b)  # releases the GIL: the readers keep going
        finally:
            for fut in futures:
                fut.cancel()
    return pos


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def _short_switch() -> Iterator[None]:
    """The interpreter's switch interval at DURING_SWITCH while any thread is inside; the first one in
    saves the interval in force and the last one out puts it back (restores in several threads)."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(DURING_SWITCH)
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class Prefetch:
    """Starts the disk on the first RESTORE_PREFETCH bytes of a file's data section while the caller
    plans where they go. ``sendfile`` to /dev/null reads through the page cache with the same readahead
    state (per open file) as the caller's reads that follow, so the disk sees one sequential stream, and
    copies nothing out. :meth:`stop` asks it to end after its current piece; :meth:`join` waits for that,
    before the file descriptor closes."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self._fd, self._pos, self._end = fd, start, min(size, start + RESTORE_PREFETCH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptd-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            while self._pos < self._end and not self._stop.is_set():
                n = os.sendfile(sink, self._fd, self._pos, min(PREFETCH_PIECE, self._end - self._pos))
                if n <= 0:
                    return
                self._pos += n
        except OSError:
            return  # advice only: the real read reports what is wrong
        finally:
            os.close(sink)

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()
