"""The trainer's side of the memory tier (memtier.py): its snapshots go into the supervisor's memory region.

:class:`MemoryTier` binds the two slots' data areas as the buffers of two :class:`Snapshot` objects (the
first is the Checkpointer's own, so restore's staging and the copy threads are the same as without the
tier) and takes a snapshot into the slot that does not hold the newest sealed one: seqlock opened,
tensors copied (the save's one copy), state JSON and safetensors header written beside them, each piece
checksummed, seqlock closed. A disk save then writes from the slot as it writes from today's buffer; a
memory-only snapshot (``snapshot_every_steps``) stops there. The caller keeps a slot a disk save still reads
from being written (:meth:`MemoryTier.next_slot` says which slot the next capture takes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from . import env, memtier, store
from .errors import CkptdError
from .persist import File
from .snapshot import Snapshot, nbytes
from .state import Encoder
from .state import dumps as state_dumps

log = logging.getLogger("ckptd")

HEADER_BYTES_PER_TENSOR = 256  # a safetensors header entry's size, generously (keys are bounded by the store)


class Source(NamedTuple):
    """The memory tier's copy of a checkpoint: its tensor file's bytes at ``offset`` in ``fd`` (``size`` of them),
    and its state.json's bytes."""

    fd: int
    offset: int
    size: int
    state: bytes


class Taken(NamedTuple):
    """A capture: the save's files (views of the slot), its tensors, and the slot they are in."""

    files: list[File]
    tensors: Mapping[str, torch.Tensor]
    slot: int


class MemoryTier:
    def __init__(self, region: memtier.Region, first: Snapshot) -> None:
        self.region = region
        self.snaps = [first, Snapshot()]
        self._bound = -1  # the region generation the snapshots' buffers are views of
        self.off = False  # refused once (said once): this life saves as without the tier

    @classmethod
    def from_env(cls, first: Snapshot, world: int) -> MemoryTier | None:
        """The tier `ckptd run --memory` offers (``$CKPTD_MEMORY_FD``), or None: not offered, or refused with
        one line (the run then saves as without it)."""
        raw = os.environ.get(env.MEMORY_FD)
        if not raw:
            return None
        try:
            region = memtier.Region.from_env(raw)
        except CkptdError as exc:
            log.warning("ckptd: memory tier off: %s", exc)
            return None
        if region is None:
            return None
        if world > 1:
            log.warning("ckptd: memory tier off: it holds one process's state and this job has %d ranks; "
                        "checkpoints go to disk as without --memory", world)
            return None
        return cls(region, first)

    def prepare(self, data_bytes: int, head_bytes: int = 0) -> bool:
        """Size the region for snapshots of ``data_bytes`` (every page allocated now) and bind the slots.
        False, with one line naming the size and the fix, when the memory is not there."""
        if self.off:
            return False
        try:
            self.region.ensure(data_bytes, head_bytes)
        except OSError as exc:
            need = memtier.plan(data_bytes, head_bytes).size
            log.warning("ckptd: memory tier off: cannot allocate %d bytes (%.1f MiB) of shared memory (%s); the run "
                        "continues with a private snapshot buffer. Fix: give the container or unit that much more "
                        "memory (docker --shm-size, a Kubernetes memory volume's sizeLimit, systemd MemoryMax) or "
                        "run without --memory", need, need / 2**20, exc.strerror or exc)
            self.release()
            self.off = True
            return False
        if self._bound != self.region.generation:
            for i, snap in enumerate(self.snaps):
                snap.adopt(torch.frombuffer(self.region.data_area(i), dtype=torch.uint8))
            self._bound = self.region.generation
        return True

    def release(self) -> None:
        """The tier is off for this life: the snapshots let the region's memory go (the first one then
        allocates a private buffer as without the tier)."""
        for snap in self.snaps:
            snap.adopt(None)
        self._bound = -1

    def source(self, info: store.CheckpointInfo, directory: str) -> Source | None:
        """The memory tier's copy of the checkpoint ``info`` of this run's ``directory``, to restore from instead of
        its files; None when there is none.
        Only before this life's first snapshot (the slots' buffers are not in use yet); the caller verifies every
        byte against the checkpoint's manifest, as it does the files'."""
        if self._bound != -1 or self.off or os.path.dirname(info.path) != directory:
            return None
        try:
            found = self.region.source(info.step)
        except OSError:
            return None
        return Source(self.region.fd, *found) if found is not None else None

    def lend(self) -> None:
        """The first slot's buffer is about to hold something else (restore's staging): it stops being a
        snapshot first."""
        if self._bound == self.region.generation and self.region.mm is not None:
            self.region.invalidate(0, 0)

    def next_slot(self) -> int | None:
        """The slot the next capture writes (never the one holding the newest sealed snapshot); None before the
        region is laid out (the first capture lays it out: no disk save can be reading a slot yet)."""
        if self.off or self._bound != self.region.generation or self.region.mm is None:
            return None
        return self.region.next_slot()

    def capture(self, tree: Any, step: int, fields: dict[str, Any], keyed: bool,
                pool: Callable[[], ThreadPoolExecutor], reading: int | None = None,
                wait: Callable[[], None] | None = None) -> Taken | None:
        """Snapshot ``tree`` into a slot and seal it; the save's files (views of the slot), its tensors and the
        slot. None when the tier cannot take this state (CUDA tensors, memory refused): the caller saves as
        without the tier, and the tier is off from then on.

        ``reading``: the slot a disk save in flight still writes from; when this capture would write that slot
        (or lay the region out anew, which drops every slot), ``wait()`` (the end of that disk save) comes first.
        A disk save is never handed bytes that change under it."""
        if self.off:
            return None
        encoder = Encoder()
        encoded = encoder.encode(tree, "")
        tensors = encoder.tensors
        state = state_dumps(encoded)
        if any(t.is_cuda for t in tensors.values()):
            log.warning("ckptd: memory tier off: CUDA tensors are snapshotted into pinned memory, which the memory "
                        "tier does not provide yet; checkpoints go to disk as without --memory")
            self.release()
            self.off = True
            return None
        data_bytes = sum(nbytes(t) for t in tensors.values())
        head_bytes = 2 * (len(state) + HEADER_BYTES_PER_TENSOR * len(tensors)) + (64 << 10)
        if reading is not None and wait is not None and (
                not self.region.fits(data_bytes, head_bytes) or self.next_slot() in (reading, None)):
            wait()
        if not self.prepare(data_bytes, head_bytes):
            return None
        i = self.region.next_slot()
        snap = self.snaps[i]
        self.region.begin(i, step)
        header, data = snap.take(tensors)

        def run(jobs: list[Callable[[], str]]) -> list[str]:
            futures = [pool().submit(j) for j in jobs[1:]]
            return [jobs[0]()] + [f.result() for f in futures] if jobs else []

        if not self.region.seal(i, step, header, state, len(data), fields, keyed,
                                lambda view: memtier.hash_pieces(view, run)):
            log.warning("ckptd: the snapshot of step %d does not fit its memory slot (state %d bytes); it goes to "
                        "disk only", step, len(state))
        return Taken([File(store.TENSORS, header, data), File(store.STATE, state)], tensors, i)
