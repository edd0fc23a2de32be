"""The memory tier: the trainer's snapshot in memory the supervisor owns, so a snapshot outlives the trainer.

`ckptd run --memory` creates an anonymous memory file (``memfd_create``: never named in a file system, so no
other run can open, plant or read it; it dies with the last process holding it, so nothing is left behind
after a SIGKILL of everything) and hands it to every life of the trainer as descriptor :data:`CHILD_FD`
(``$CKPTD_MEMORY_FD``). The trainer sizes and lays out the region and snapshots into it: the region's data
area *is* the snapshot buffer (the save's one copy, no second resident copy). When the trainer dies with a
snapshot sealed but not committed, the supervisor (which never imports torch) writes it as the same
checkpoint through the store's writer and commit protocol (:func:`persist_pending`) before the restart.

Layout (little-endian; every area page-aligned)::

    page 0          region header: MAGIC, version, slots, slot size, head capacity, data capacity
    slot i          at PAGE + i * slot size:
      page          slot header: SLOT_MAGIC, seq (begin), step, meta length, seq (end)
      head area     meta JSON | state.json | the safetensors header
      data area     the safetensors data section (the snapshot buffer)

Two slots, written alternately, so a snapshot being written never destroys the last good one. Each slot is
a seqlock: the writer makes ``seq`` odd before it touches the slot and, once every byte and the meta (the
step, the checkpoint's fields, each blob's place and each piece's xxh3-64) is in, writes ``seq + 1`` to the
end word and then to the begin word. A slot is used only when both words are equal and even, its meta
parses within bounds, and every piece's checksum matches: a snapshot the trainer died in the middle of is
never used. Everything read from a region is bounds-checked like a file from disk.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from . import store
from .errors import CkptdError

PAGE = 4096
MAGIC = b"CKPTDMT1"
SLOT_MAGIC = b"CKPTSLOT"
VERSION = 1
SLOTS = 2
CHILD_FD = 3  # the region's descriptor number in the trainer (dup2'd there by the supervisor's spawn)
MEMFD_NAME = "ckptd-memory"
PIECE = 64 << 20  # checksum granularity of the data area
MIN_HEAD = 1 << 20
MAX_META = 1 << 20  # bound on a slot's meta JSON
_REGION = struct.Struct("<8sIIQQQ")  # magic, version, slots, slot_size, head_cap, data_cap
_SLOT = struct.Struct("<8sQQQQ")  # magic, seq, step, meta_len, seq_end
SEQ_OFF, STEP_OFF, META_LEN_OFF, SEQ_END_OFF = 8, 16, 24, 32
# the manifest fields a trainer's save adds besides kind and metrics (persist: _persist's extra): nothing
# read from a region may set any other field of a manifest
EXTRA_FIELDS = ("epoch", "versions", "run_id", "origin", "stage", "lineage")


def page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class Layout:
    head_cap: int
    data_cap: int

    @property
    def slot_size(self) -> int:
        return PAGE + self.head_cap + self.data_cap

    @property
    def size(self) -> int:
        return PAGE + SLOTS * self.slot_size

    def slot(self, i: int) -> int:
        return PAGE + i * self.slot_size

    def head(self, i: int) -> int:
        return self.slot(i) + PAGE

    def data(self, i: int) -> int:
        return self.head(i) + self.head_cap


def plan(data_bytes: int, head_bytes: int = 0) -> Layout:
    """A layout whose slots hold ``data_bytes`` of tensor data and ``head_bytes`` of meta, state and header."""
    return Layout(page_up(max(MIN_HEAD, head_bytes)), page_up(max(data_bytes, 1)))


# ----------------------------------------------------------------------------- the supervisor's side


def create() -> int:
    """A new, empty region: an anonymous memory file (close-on-exec: only the trainer gets it, by dup2).
    Raises CkptdError where the kernel has no memfd_create."""
    if not hasattr(os, "memfd_create"):
        raise CkptdError("--memory needs memfd_create (Linux 3.17 or later); run without --memory")
    try:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    except OSError as exc:
        raise CkptdError(f"--memory: cannot create the memory region ({exc.strerror}); run without --memory") \
            from None
    if fd <= CHILD_FD + 2:  # keep it clear of the descriptor number the child gets it as
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        fd = high
    return fd


def region_bytes(fd: int) -> int:
    """What the region holds now (the trainer sizes it; shared memory, never the supervisor's heap)."""
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


@dataclass(frozen=True)
class SlotState:
    """What a slot's header says, checksums not verified: ``sealed`` (a snapshot of ``step``), ``open`` (a writer is
    in it, or died in it: never used), ``empty``."""

    slot: int
    state: str
    step: int | None


def slot_states(fd: int) -> tuple[int, list[SlotState]]:
    """(bytes of a slot's data area, each slot's header) for `ckptd status` and the metrics: read with pread,
    so nothing is mapped; headers only, so a sealed slot here is not yet verified (``newest_sealed`` does that).
    (0, []) before the trainer laid the region out."""
    try:
        raw = os.pread(fd, _REGION.size, 0)
    except OSError:
        return 0, []
    if len(raw) < _REGION.size:
        return 0, []
    magic, version, slots, slot_size, head_cap, data_cap = _REGION.unpack(raw)
    layout = Layout(head_cap, data_cap)
    if magic != MAGIC or version != VERSION or slots != SLOTS or slot_size != layout.slot_size:
        return 0, []
    out = []
    for i in range(SLOTS):
        try:
            head = os.pread(fd, _SLOT.size, layout.slot(i))
        except OSError:
            return 0, []
        if len(head) < _SLOT.size:
            return 0, []
        smagic, seq, step, _, seq_end = _SLOT.unpack(head)
        if smagic != SLOT_MAGIC:
            out.append(SlotState(i, "empty", None))
        elif seq % 2 or seq != seq_end:
            out.append(SlotState(i, "open", step))
        else:
            out.append(SlotState(i, "sealed", step))
    return data_cap, out


@dataclass(frozen=True)
class Pending:
    """A sealed, verified snapshot found in a region."""

    slot: int
    step: int
    meta: dict[str, Any]


def _read_layout(mm: mmap.mmap) -> Layout | None:
    if len(mm) < PAGE:
        return None
    magic, version, slots, slot_size, head_cap, data_cap = _REGION.unpack_from(mm, 0)
    if magic != MAGIC or version != VERSION or slots != SLOTS or head_cap % PAGE or data_cap % PAGE:
        return None
    layout = Layout(head_cap, data_cap)
    if slot_size != layout.slot_size or layout.size > len(mm):
        return None
    return layout


def _slot_problem(mm: mmap.mmap, layout: Layout, i: int, verify: bool = True) -> tuple[str, dict[str, Any] | None]:
    """("", meta) for a sealed slot whose every checksum matches (``verify``; else its bounds only), else (why
    it is not used, None)."""
    base = layout.slot(i)
    magic, seq, step, meta_len, seq_end = _SLOT.unpack_from(mm, base)
    if magic != SLOT_MAGIC:
        return "empty", None
    if seq % 2 or seq != seq_end:
        return "torn (the writer died in it)", None
    if not 0 < meta_len <= min(MAX_META, layout.head_cap):
        return "meta out of bounds", None
    head = layout.head(i)
    raw = bytes(mm[head : head + meta_len])
    try:
        meta = store.load_json(raw, "memory slot", "meta", 32, 200_000)
    except CkptdError as exc:
        return str(exc), None
    if not isinstance(meta, dict) or meta.get("step") != step or not isinstance(meta.get("blobs"), dict) or \
            set(meta["blobs"]) != {"header", "state", "data"}:
        return "meta does not describe the slot", None
    for name, blob in meta["blobs"].items():
        if not (isinstance(blob, list) and len(blob) == 3 and all(isinstance(v, int) and v >= 0 for v in blob[:2])):
            return f"blob {name!r} malformed", None
        off, n = blob[0], blob[1]
        area_end = layout.data(i) + layout.data_cap if name == "data" else layout.data(i)
        start = layout.data(i) if name == "data" else head
        if start + off + n > area_end or (name != "data" and off < meta_len):
            return f"blob {name!r} out of bounds", None
    pieces = meta["blobs"].get("data", [0, 0, []])[2]
    if not isinstance(pieces, list):
        return "data checksums malformed", None
    if verify and checksums(mm, layout, i, meta["blobs"]) != {k: b[2] for k, b in meta["blobs"].items()}:
        return "checksum mismatch", None
    return "", meta


def checksums(mm: Any, layout: Layout, i: int, blobs: dict[str, Any]) -> dict[str, Any]:
    """Each head blob's xxh3-64, and the data's per PIECE."""
    out: dict[str, Any] = {}
    view = memoryview(mm)
    try:
        for name, (off, n, _) in blobs.items():
            if name == "data":
                start = layout.data(i) + off
                out[name] = [xxhash.xxh3_64_hexdigest(view[start + p : start + min(p + PIECE, n)])
                             for p in range(0, n, PIECE)]
            else:
                start = layout.head(i) + off
                out[name] = xxhash.xxh3_64_hexdigest(view[start : start + n])
    finally:
        view.release()
    return out


def newest_sealed(fd: int) -> tuple[Pending | None, list[str]]:
    """The newest verified snapshot in the region (None when there is none) and why each other slot is not
    used. Maps the region read-only for the call only (the supervisor's RSS stays low)."""
    size = region_bytes(fd)
    if size < PAGE:
        return None, []
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        layout = _read_layout(mm)
        if layout is None:
            return None, ["no layout"]
        found: list[Pending] = []
        notes = []
        for i in range(SLOTS):
            why, meta = _slot_problem(mm, layout, i)
            if meta is None:
                notes.append(f"slot {i}: {why}")
            else:
                found.append(Pending(i, meta["step"], meta))
    return (max(found, key=lambda p: p.step) if found else None), notes


def persist_pending(fd: int, root: str, key: store.Key | None = None) -> tuple[str | None, Pending | None, str]:
    """Write the region's newest verified snapshot as its checkpoint unless a valid one of that step, or a
    newer one, is on disk: through :class:`store.PendingCheckpoint`, the same files, checksums and manifest
    the trainer's own save writes. Returns (the checkpoint's path or None, the snapshot, why nothing).
    Storage errors raise (StorageError), as for any writer."""
    pending, notes = newest_sealed(fd)
    if pending is None:
        return None, None, "; ".join(notes) or "no snapshot"
    newest = store.latest_valid(root, key) if os.path.isdir(root) else None
    if newest is not None and newest.step >= pending.step:
        return None, pending, f"step {newest.step} is on disk"
    meta = pending.meta
    if meta.get("keyed") and key is None:
        return None, pending, "the snapshot is of an authenticated run and the supervisor has no key"
    size = region_bytes(fd)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        layout = _read_layout(mm)
        assert layout is not None
        return _write(mm, layout, pending, root, key), pending, ""


def _write(mm: mmap.mmap, layout: Layout, pending: Pending, root: str, key: store.Key | None) -> str:
    meta, i = pending.meta, pending.slot
    blobs = meta["blobs"]
    view = memoryview(mm)
    try:
        def head(name: str) -> bytes:
            off, n, _ = blobs[name]
            return bytes(view[layout.head(i) + off : layout.head(i) + off + n])

        fields: dict[str, Any] = meta["fields"] if isinstance(meta.get("fields"), dict) else {}
        kind = str(fields["kind"]) if fields.get("kind") in store.KINDS else "periodic"
        metrics: dict[str, Any] = fields["metrics"] if isinstance(fields.get("metrics"), dict) else {}
        extra_in: dict[str, Any] = fields["extra"] if isinstance(fields.get("extra"), dict) else {}
        extra = {k: extra_in[k] for k in EXTRA_FIELDS if k in extra_in}
        doff, dn, _ = blobs["data"]
        with view[layout.data(i) + doff : layout.data(i) + doff + dn] as data, \
                store.PendingCheckpoint(root, pending.step, key) as pc:
            # write_file, not write_aligned: O_DIRECT from a read-only map is refused; the bytes are the same
            pc.write_file(store.TENSORS, (head("header"), data))
            pc.write_file(store.STATE, (head("state"),))
            return pc.commit(kind=kind, metrics=metrics, extra=extra)
    finally:
        view.release()


# ----------------------------------------------------------------------------- the trainer's side


class Region:
    """The trainer's map of the region: lays it out, hands out each slot's data area, seals snapshots."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mm: mmap.mmap | None = None
        self.layout: Layout | None = None
        self.generation = 0  # raised by every re-layout: views of an older map must be dropped

    @classmethod
    def from_env(cls, raw: str | None) -> Region | None:
        """The region named by ``$CKPTD_MEMORY_FD``: refused (CkptdError) unless it is an anonymous memory
        file of ckptd's, so a descriptor of anything else is never written."""
        if not raw:
            return None
        try:
            fd = int(raw)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except (ValueError, OSError):
            raise CkptdError(f"CKPTD_MEMORY_FD={raw!r} is not an open descriptor; `ckptd run --memory` sets it, "
                             "unset it otherwise") from None
        if not target.startswith(f"/memfd:{MEMFD_NAME}"):
            raise CkptdError(f"CKPTD_MEMORY_FD={raw!r} is {target}, not ckptd's memory region; unset it")
        return cls(fd)

    def ensure(self, data_bytes: int, head_bytes: int = 0) -> bool:
        """Lay the region out for snapshots of ``data_bytes`` (and ``head_bytes`` of state and header) unless it
        already fits; every page is allocated now (posix_fallocate), so a region too large fails here with
        OSError (ENOSPC, ENOMEM) and never later as a SIGBUS in a copy. True when laid out anew (every slot
        then empty: the caller's views of the old map are stale)."""
        old = self.layout
        if self.mm is None:
            old = self._adopt_existing()
        if old is not None and old.data_cap >= data_bytes and old.head_cap >= head_bytes:
            return False
        layout = plan(data_bytes, head_bytes)
        self.mm, self.layout = None, None
        os.ftruncate(self.fd, 0)  # every slot goes: a slot can never describe bytes of another layout
        os.ftruncate(self.fd, layout.size)
        try:
            os.posix_fallocate(self.fd, 0, layout.size)
        except OSError:
            os.ftruncate(self.fd, 0)
            raise
        mm = mmap.mmap(self.fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _REGION.pack_into(mm, 0, MAGIC, VERSION, SLOTS, layout.slot_size, layout.head_cap, layout.data_cap)
        self.mm, self.layout = mm, layout
        self.generation += 1
        return True

    def fits(self, data_bytes: int, head_bytes: int = 0) -> bool:
        """The region as laid out holds snapshots of this size (:meth:`ensure` would keep it as it is)."""
        layout = self.layout
        return layout is not None and layout.data_cap >= data_bytes and layout.head_cap >= head_bytes

    def _adopt_existing(self) -> Layout | None:
        """A region an earlier life laid out: map it (its sealed slots stay readable)."""
        size = region_bytes(self.fd)
        if size < PAGE:
            return None
        mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        layout = _read_layout(mm)
        if layout is None:
            mm.close()
            return None
        self.mm, self.layout = mm, layout
        self.generation += 1
        return layout

    def source(self, step: int) -> tuple[int, int, bytes] | None:
        """Where a sealed snapshot of ``step`` lies, read like a checkpoint's files: (offset of its tensor file in
        the region, that file's size, its state.json's bytes); None when no slot holds one. Bounds only: the
        caller verifies the bytes against the checkpoint's manifest as it reads them, like a file's."""
        if self.mm is None and self._adopt_existing() is None:
            return None
        assert self.mm is not None and self.layout is not None
        for i, sealed in enumerate(self.steps()):
            if sealed != step:
                continue
            why, meta = _slot_problem(self.mm, self.layout, i, verify=False)
            blobs = meta["blobs"] if meta is not None else {}
            if not {"header", "state", "data"} <= set(blobs) or blobs["header"][0] + blobs["header"][1] != \
                    self.layout.head_cap or blobs["data"][0] != 0:
                continue
            soff, sn, _ = blobs["state"]
            start = self.layout.data(i) - blobs["header"][1]
            state = bytes(self.mm[self.layout.head(i) + soff : self.layout.head(i) + soff + sn])
            return start, blobs["header"][1] + blobs["data"][1], state
        return None

    def data_area(self, i: int) -> memoryview:
        assert self.mm is not None and self.layout is not None
        start = self.layout.data(i)
        return memoryview(self.mm)[start : start + self.layout.data_cap]

    def steps(self) -> list[int | None]:
        """Each slot's sealed step (None: empty or torn). Cheap: headers only, no checksums."""
        assert self.mm is not None and self.layout is not None
        out: list[int | None] = []
        for i in range(SLOTS):
            magic, seq, step, _, seq_end = _SLOT.unpack_from(self.mm, self.layout.slot(i))
            out.append(step if magic == SLOT_MAGIC and not seq % 2 and seq == seq_end else None)
        return out

    def next_slot(self) -> int:
        """The slot to write next: never the one holding the newest sealed snapshot."""
        steps = self.steps()
        if steps[0] is None:
            return 0
        if steps[1] is None:
            return 1
        return 0 if steps[0] < steps[1] else 1

    def begin(self, i: int, step: int) -> None:
        """The writer enters slot ``i``: its seq becomes odd before a byte of it changes."""
        assert self.mm is not None and self.layout is not None
        base = self.layout.slot(i)
        magic, seq, _, _, _ = _SLOT.unpack_from(self.mm, base)
        seq = seq if magic == SLOT_MAGIC else 0
        odd = seq + 1 if seq % 2 == 0 else seq + 2
        struct.pack_into("<8sQ", self.mm, base, SLOT_MAGIC, odd)
        struct.pack_into("<Q", self.mm, base + STEP_OFF, step)

    invalidate = begin  # a slot about to be used for something else (restore's staging) is torn on purpose

    def seal(self, i: int, step: int, header: bytes, state: bytes, data_len: int, fields: dict[str, Any],
             keyed: bool, hash_data: Callable[[memoryview], list[str]] | None = None) -> bool:
        """Write the head blobs and the meta of the snapshot copied into slot ``i``, then close the seqlock.
        False (the slot stays torn) when the head blobs do not fit: that save goes to disk only."""
        assert self.mm is not None and self.layout is not None
        layout, mm = self.layout, self.mm
        head = layout.head(i)
        fields_json = json.dumps(fields, separators=(",", ":"), allow_nan=False, default=str)
        # the meta goes first in the head area; reserve for it: fields + per-piece hashes + a margin
        meta_room = page_up(len(fields_json) + 64 * (data_len // PIECE + 8) + 1024)
        state_off = meta_room
        # the safetensors header ends where the data area starts: the tensor file is one contiguous span of
        # the region, which a restart reads like the file itself (:meth:`Region.source`)
        header_off = layout.head_cap - len(header)
        if state_off + len(state) > header_off or data_len > layout.data_cap:
            return False
        mm[head + state_off : head + state_off + len(state)] = state
        mm[head + header_off : head + header_off + len(header)] = header
        blobs: dict[str, Any] = {"state": [state_off, len(state), None], "header": [header_off, len(header), None],
                                 "data": [0, data_len, None]}
        if hash_data is not None:
            view = self.data_area(i)
            try:
                sums = checksums(mm, layout, i, {k: v for k, v in blobs.items() if k != "data"})
                sums["data"] = hash_data(view[:data_len])
            finally:
                view.release()
        else:
            sums = checksums(mm, layout, i, blobs)
        for k in blobs:
            blobs[k][2] = sums[k]
        meta = json.dumps({"step": step, "blobs": blobs, "keyed": keyed, "fields": json.loads(fields_json)},
                          separators=(",", ":")).encode()
        if len(meta) > min(meta_room, MAX_META):
            return False
        mm[head : head + len(meta)] = meta
        base = layout.slot(i)
        seq = struct.unpack_from("<Q", mm, base + SEQ_OFF)[0]
        struct.pack_into("<Q", mm, base + META_LEN_OFF, len(meta))
        struct.pack_into("<Q", mm, base + SEQ_END_OFF, seq + 1)
        struct.pack_into("<Q", mm, base + SEQ_OFF, seq + 1)
        return True


def hash_pieces(view: memoryview, run: Callable[[list[Callable[[], str]]], list[str]] | None = None) -> list[str]:
    """xxh3-64 of each PIECE of ``view`` (``run`` spreads the pieces over threads; xxhash releases the GIL)."""
    def piece(p: int) -> Callable[[], str]:
        return lambda: xxhash.xxh3_64_hexdigest(view[p : p + PIECE])

    jobs = [piece(p) for p in range(0, len(view), PIECE)]
    return run(jobs) if run is not None else [j() for j in jobs]
