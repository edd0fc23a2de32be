"""`ckptd run --memory`: the memory region the trainer's snapshots go into, held across the trainer's lives.

The supervisor creates the region (memtier.create: an anonymous memory file, never named in a file system)
and keeps its descriptor; each life gets it as descriptor memtier.CHILD_FD. After a life ends, and before
the core judges the exit (so before any restart), :meth:`MemoryHold.finish` writes a snapshot that was
sealed but not committed as its checkpoint (memtier.persist_pending: the store's writer and commit). The
memory is shared, not this process's heap: it is mapped only for that call. Closing the descriptor at the
end of the run releases it; a SIGKILLed supervisor releases it with its last holder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .. import memtier, store


@dataclass(frozen=True)
class Finished:
    """What :meth:`MemoryHold.finish` did: ``path`` of the checkpoint it wrote (None: nothing to write)."""

    path: str | None
    step: int | None
    why: str


class MemoryHold:
    def __init__(self, fd: int, key: store.Key | None = None) -> None:
        self.fd = fd
        self.key = key
        self.persisted = 0  # snapshots written after their trainer died

    @classmethod
    def open(cls, key_file: str | None = None, allow_unkeyed: bool = False) -> MemoryHold:
        """A new region; CkptdError (one line naming the fix) where it cannot be made."""
        key = store.Key.load(key_file, allow_unkeyed=allow_unkeyed) if key_file else None
        return cls(memtier.create(), key)

    def child_fds(self) -> tuple[tuple[int, int], ...]:
        """(descriptor here, number in the child) for the spawn."""
        return ((self.fd, memtier.CHILD_FD),)

    def bytes(self) -> int:
        return memtier.region_bytes(self.fd)

    def describe(self) -> dict[str, Any]:
        """The region for `ckptd status`: its size, a slot's, each slot's header (not verified) and the newest
        sealed snapshot's step."""
        slot_bytes, slots = memtier.slot_states(self.fd)
        sealed = [s.step for s in slots if s.state == "sealed" and s.step is not None]
        return {"region_bytes": self.bytes(), "slot_bytes": slot_bytes,
                "slots": [{"slot": s.slot, "state": s.state, "step": s.step} for s in slots],
                "newest_snapshot_step": max(sealed) if sealed else None, "persisted": self.persisted}

    def finish(self, root: str) -> Finished:
        """The trainer is gone (and its leftovers killed): write its sealed, uncommitted snapshot. A storage
        error raises (StorageError), as for every writer."""
        path, pending, why = memtier.persist_pending(self.fd, root, self.key)
        if path is not None:
            self.persisted += 1
        return Finished(path, pending.step if pending is not None else None, why)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
