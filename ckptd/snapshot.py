"""The save's stall: tensors copied into one reused host buffer, laid out as a safetensors data section.

:class:`Snapshot` owns the buffer (page-aligned, so the writer can use O_DIRECT) and the copy threads;
:func:`balance` and :func:`run_parts` split a copy over those threads (the snapshot here, and restore's
apply of staged tensors in ``restore.py``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from . import store
from .state import DTYPES

PARALLEL_COPY_BYTES = 32 << 20  # below this a copy runs on the calling thread alone
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))  # the loop is blocked during the copy anyway

T = TypeVar("T")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def balance(items: list[T], size: Callable[[T], int], parts: int = COPY_THREADS) -> list[list[T]]:
    """``items`` in ``parts`` lists of about equal total ``size``: largest first, each to the lightest list."""
    out: list[list[T]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for item in sorted(items, key=lambda it: -size(it)):
        i = loads.index(min(loads))
        out[i].append(item)
        loads[i] += size(item)
    return out


def run_parts(parts: list[list[T]], work: Callable[[list[T]], None], pool: ThreadPoolExecutor) -> None:
    """``work`` on every part at once: the first on this thread, the others on ``pool``; waits for all."""
    others = [pool.submit(work, part) for part in parts[1:]]
    try:
        work(parts[0])
    finally:
        for f in others:
            f.result()


def _copy_into(dests: list[tuple[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor]) -> None:
    for k, dest in dests:
        t = tensors[k]
        if not t.numel():
            continue
        if t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            # libc memmove: 1.3-1.4x faster than torch's copy_ for these sizes here (docs/performance.md,
            # P1); ctypes releases the GIL, so the copy threads run in parallel. Same dtype and shape:
            # the bytes are the value.
            ctypes.memmove(dest.data_ptr(), t.data_ptr(), nbytes(t))
        else:
            dest.copy_(t, non_blocking=t.is_cuda)


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], pool: ThreadPoolExecutor | None = None) -> None:
    """Copy each (destination, source) pair of the same dtype and shape: contiguous CPU destinations by
    libc memmove over up to COPY_THREADS threads (with ``pool``), the others with ``copy_``."""
    fast = [(d, s) for d, s in pairs if d.is_cpu and d.is_contiguous() and s.numel()]
    slow = [(d, s) for d, s in pairs if not (d.is_cpu and d.is_contiguous())]

    def run(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for d, s in part:
            ctypes.memmove(d.data_ptr(), s.data_ptr(), nbytes(s))  # same dtype and shape: bytes are the value

    if pool is None or COPY_THREADS < 2 or sum(nbytes(s) for _, s in fast) < PARALLEL_COPY_BYTES:
        run(fast)
    else:
        run_parts(balance(fast, lambda ds: nbytes(ds[1])), run, pool)
    with torch.no_grad():
        for d, s in slow:
            d.copy_(s, non_blocking=d.is_cuda)
    for device in {d.device for d, _ in slow if d.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


class Snapshot:
    """Host buffer reused across saves; tensors laid out as a safetensors data section.

    The buffer is page-aligned (anonymous mmap with transparent huge pages, or pinned memory when CUDA
    tensors are saved) so the writer can use O_DIRECT. Every slice is aligned for its dtype (and most to a
    cache line), so it is viewed as that dtype without a copy. The layout,
    header and destination views are cached while the state's structure does not change.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.allocations = 0
        self._signature: tuple[Any, ...] | None = None
        self._header = b""
        self._dests: list[tuple[str, torch.Tensor]] = []
        self._parts: list[list[tuple[str, torch.Tensor]]] = []
        self._total = 0
        self._helper: ThreadPoolExecutor | None = None

    def allocate(self, size: int, pinned: bool) -> None:
        """A new buffer of ``size`` bytes (not touched: the caller writes every page, or zeroes it)."""
        self.buffer = None  # free the old one before allocating the new
        self._signature = None
        size = max(size, 1)
        if pinned:
            raw = torch.empty(size + store.ALIGN, dtype=torch.uint8, pin_memory=True)
            shift = -raw.data_ptr() % store.ALIGN
            self.buffer = raw[shift : shift + size]
        else:
            # Shared anonymous memory (Python's default for mmap(-1)): forked children (DataLoader
            # workers) share it instead of marking it copy-on-write, so saves after a fork pay no COW
            # faults. Private anonymous memory with transparent huge pages was tried: its copy was not
            # faster (slower after a pause on this VM; docs/performance.md).
            mem = mmap.mmap(-1, size)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mem.madvise(mmap.MADV_HUGEPAGE)  # effective only where shmem THP is set to "advise"
                except OSError:
                    pass
            self.buffer = torch.frombuffer(mem, dtype=torch.uint8)
        self.allocations += 1

    def adopt(self, buffer: torch.Tensor | None) -> None:
        """Use ``buffer``, memory owned elsewhere (a slot of the memory tier, memory.py), as the buffer; None
        lets it go (the next take() allocates one of its own)."""
        self.buffer, self._dests, self._parts, self._signature = buffer, [], [], None

    def helper(self) -> ThreadPoolExecutor:
        """Copy threads, started once and kept (starting threads costs ~8 ms each on a busy VM)."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=max(1, COPY_THREADS - 1), thread_name_prefix="ckptd-copy")
        return self._helper

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
        self.buffer, self._dests, self._parts, self._signature = None, [], [], None

    def prewarm(self, size: int, pinned: bool) -> None:
        """Allocate and touch the buffer ahead of the first save (first-touch page faults are slow)."""
        if self.buffer is None or self.buffer.numel() < size:
            self.allocate(size, pinned)
            assert self.buffer is not None
            self.buffer.zero_()

    def take(self, tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, memoryview]:
        """Copy ``tensors`` into the buffer (the save's stall); returns (header, data view)."""
        signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in tensors.items())
        cuda = any(t.is_cuda for t in tensors.values())
        if signature != self._signature or self.buffer is None:
            self._lay_out(tensors, signature, cuda)
        if cuda or self._total < PARALLEL_COPY_BYTES or COPY_THREADS < 2:
            _copy_into(self._dests, tensors)
        else:
            # The loop is blocked anyway: copy with COPY_THREADS threads (memmove releases the GIL).
            run_parts(self._parts, lambda part: _copy_into(part, tensors), self.helper())
        if cuda:  # the non_blocking copies were queued on each device's current stream
            for device in {t.device for t in tensors.values() if t.is_cuda}:
                torch.cuda.current_stream(device).synchronize()
        assert self.buffer is not None
        return self._header, memoryview(self.buffer.numpy()).cast("B")[: self._total]  # type: ignore[arg-type]

    def _lay_out(self, tensors: Mapping[str, torch.Tensor], signature: tuple[Any, ...], cuda: bool) -> None:
        # Tensors whose size is a multiple of 64 bytes first: each then starts cache-line aligned
        # (unaligned destinations copy ~25% slower). The rest by element size, largest first, which
        # keeps every slice naturally aligned for its dtype. No gaps: safetensors allows none.
        order = sorted(tensors, key=lambda k: (nbytes(tensors[k]) % 64 != 0, -tensors[k].element_size()))
        entries = [(k, DTYPES[tensors[k].dtype], list(tensors[k].shape), nbytes(tensors[k])) for k in order]
        total = sum(e[3] for e in entries)
        if self.buffer is None or self.buffer.numel() < total or (cuda and not self.buffer.is_pinned()):
            self.allocate(total, cuda)
        buf = self.buffer
        assert buf is not None
        self._header = store.safetensors_header_bytes(entries, {"format": "ckptd"}, align=store.ALIGN)
        self._dests, off = [], 0
        for k, _, _shape, n in entries:
            t = tensors[k]
            self._dests.append((k, buf[off : off + n].view(t.dtype).view(t.shape)))
            off += n
        self._total, self._signature = total, signature
        self._parts = balance(self._dests, lambda kd: nbytes(kd[1]))
