"""The on-disk checkpoint store: the only module that writes checkpoint files.

Layout under a root directory::

    ROOT/
      step-000000001200/          one directory per checkpoint, visible only when complete
        tensors.safetensors       every tensor (safetensors format, loadable by `safetensors` alone)
        state.json                structure and non-tensor state (JSON; tensors referenced by key)
        manifest.json             written last: format, step, kind, files with size + xxh3-128, digest
      .tmp-step-...-PID-XXXX/     a checkpoint being written (removed at start when its writer is gone)
      .quarantine/NAME-TIME/      checkpoints that failed verification, with QUARANTINE.json saying why
      .pins/NAME                  pinned checkpoints (never deleted by retention)

Commit protocol: write into a temporary directory in the same root, fsync every
file, write the manifest last, fsync it, fsync the temp directory, rename it to
its final name, fsync the root. Any storage error aborts: the temp directory is
removed, nothing is published, the error names the path and the cause, and no
fsync is ever retried.

Nothing here imports torch: the supervisor and the inspection commands use it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import queue
import threading
import logging
import os
import re
import shutil
import socket
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash

from .errors import CkptdError, CorruptCheckpointError, NotFoundError, StorageError

log = logging.getLogger("ckptd")

FORMAT = "ckptd/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
QUARANTINE_DIR = ".quarantine"
PINS_DIR = ".pins"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
KINDS = ("periodic", "emergency", "manual", "final")
HASH = "xxh3_128"

NAME_RE = re.compile(r"^step-(\d{12,20})$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MANIFEST_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20  # bound on a safetensors JSON header we are willing to parse
MAX_STATE_BYTES = 1 << 30  # bound on state.json
CHUNK = 8 << 20  # buffered write/read/hash granularity
DIRECT_CHUNK = 16 << 20  # O_DIRECT request size (as fast as 64 MiB here; finer steps for pacing)
READ_CHUNK = 16 << 20  # restore read request: small enough that hashing the last one adds little after the read ends
READERS = 2  # restore read requests in flight (docs/performance.md, P3)
MAX_IOV = 512  # buffers per preadv (IOV_MAX is 1024 on Linux)
Pace = Callable[[float], None]
"""Called by the writers after each piece with the seconds it took; a background save sleeps
there to leave the disk and memory bandwidth to the training loop (Checkpointer(pace=...))."""
ALIGN = 4096  # O_DIRECT alignment of file offsets, lengths and memory; the tensor data section starts here
FILE_MODE = 0o644  # further reduced by the umask; never world-writable
DIR_MODE = 0o755


def checkpoint_name(step: int) -> str:
    if not isinstance(step, int) or step < 0:
        raise CkptdError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def check_name(name: str) -> str:
    """Refuse names that could escape the root (``..``, separators, hidden files)."""
    if not isinstance(name, str) or not (NAME_RE.match(name) or FILE_RE.match(name)) or name in (".", ".."):
        raise CkptdError(f"invalid checkpoint or file name {name!r}: names are plain words like step-000000001200, "
                         "without '/', '..' or a leading dot")
    return name


def new_hasher() -> Any:
    return xxhash.xxh3_128()


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage(path: str, op: str, exc: OSError) -> StorageError:
    return StorageError(path, op, exc)


# ----------------------------------------------------------------------------- writing


def lower_thread_priority(nice: int = 10) -> None:
    """Let the training thread win the CPU over background checkpoint work (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass


class HashPipe:
    """xxh3-128 computed in a helper thread while the caller writes or reads the same bytes.

    xxhash and the I/O both release the GIL, so hashing costs no wall time as long as it is
    faster than the disk (xxh3 is several GB/s per core). Feed views in file order.
    """

    def __init__(self) -> None:
        self._h = new_hasher()
        self._q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name="ckptd-hash", daemon=True)
        self._t.start()

    def _run(self) -> None:
        lower_thread_priority()
        while (mv := self._q.get()) is not None:
            self._h.update(mv)

    def feed(self, data: bytes | memoryview) -> None:
        self._q.put(memoryview(data))

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


def is_aligned(mv: memoryview) -> bool:
    """Whether a writable buffer starts on an ALIGN boundary (O_DIRECT needs it); read-only ones never qualify."""
    if not len(mv):
        return True
    return not mv.readonly and ctypes.addressof(ctypes.c_char.from_buffer(mv)) % ALIGN == 0


@dataclass
class FileRecord:
    bytes: int
    xxh3_128: str


class PendingCheckpoint:
    """A checkpoint being written in a temporary directory of the root.

    Use as a context manager: leaving the block without :meth:`commit` (an
    exception, a storage error) removes the temporary directory.
    """

    def __init__(self, root: str, step: int) -> None:
        self.root = root
        self.step = step
        self.name = checkpoint_name(step)
        self.files: dict[str, FileRecord] = {}
        self.committed_path: str | None = None
        os.makedirs(root, mode=DIR_MODE, exist_ok=True)
        tmp = f"{TMP_PREFIX}{self.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = os.path.join(root, tmp)
        try:
            os.mkdir(self.tmp, DIR_MODE)
        except OSError as exc:
            raise _storage(self.tmp, "mkdir", exc) from exc

    def __enter__(self) -> PendingCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed_path is None:
            self.abort()

    def write_file(self, name: str, chunks: Iterable[bytes | bytearray | memoryview],
                   pace: Pace | None = None) -> FileRecord:
        """Write ``chunks`` to ``name``, hashing while writing; fsync and close it.

        ``pace(seconds)`` is called after each piece's write with the time it took (see :data:`Pace`).
        """
        check_name(name)
        path = os.path.join(self.tmp, name)
        h = new_hasher()
        size = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise _storage(path, "open", exc) from exc
        try:
            for chunk in chunks:
                mv = memoryview(chunk).cast("B")
                for off in range(0, len(mv), CHUNK):
                    piece = mv[off : off + CHUNK]
                    h.update(piece)
                    _write_all(fd, piece, path, pace)
                    size += len(piece)
            _fsync(fd, path)
        finally:
            _close(fd, path)
        rec = FileRecord(size, h.hexdigest())
        self.files[name] = rec
        return rec

    def write_aligned(self, name: str, header: bytes, data: memoryview, pace: Pace | None = None) -> FileRecord:
        """Write ``header`` + ``data`` with O_DIRECT where the filesystem allows it.

        Bypassing the page cache doubles durable write throughput here (no copy into the cache, no
        writeback storm at fsync). Needs ``len(header) % ALIGN == 0`` and page-aligned ``data``;
        otherwise, or where O_DIRECT is refused (tmpfs), this is :meth:`write_file`. The checksum is
        computed in a helper thread alongside the writes.
        """
        check_name(name)
        direct = getattr(os, "O_DIRECT", 0)
        data = memoryview(data).cast("B")
        if not direct or len(header) % ALIGN or not is_aligned(data):
            return self.write_file(name, (header, data), pace)
        path = os.path.join(self.tmp, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | direct, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # filesystem without O_DIRECT
                return self.write_file(name, (header, data), pace)
            raise _storage(path, "open", exc) from exc
        pipe = HashPipe()
        try:
            head = mmap.mmap(-1, len(header))  # page-aligned copy for O_DIRECT
            head.write(header)
            pipe.feed(header)
            try:
                _write_all(fd, memoryview(head), path)
            except StorageError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(fd)
                fd = -1
                os.unlink(path)
                return self.write_file(name, (header, data), pace)
            body = len(data) - len(data) % ALIGN
            for off in range(0, body, DIRECT_CHUNK):
                piece = data[off : min(off + DIRECT_CHUNK, body)]
                pipe.feed(piece)
                _write_all(fd, piece, path, pace)
            if body < len(data):  # the unaligned tail goes through the page cache
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
                pipe.feed(data[body:])
                _write_all(fd, data[body:], path)
            _fsync(fd, path)
        finally:
            digest = pipe.hexdigest()
            if fd >= 0:
                _close(fd, path)
        rec = FileRecord(len(header) + len(data), digest)
        self.files[name] = rec
        return rec

    def commit(self, *, kind: str, metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
        """Write the manifest and publish the checkpoint under its final name. Returns its path."""
        if kind not in KINDS:
            raise CkptdError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "step": self.step,
            "kind": kind,
            "created": time.time(),
            "hash": HASH,
            "files": {n: {"bytes": r.bytes, HASH: r.xxh3_128} for n, r in sorted(self.files.items())},
            "metrics": metrics or {},
        }
        manifest.update(extra or {})
        manifest["digest"] = _digest(manifest)
        data = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()
        self.write_file(MANIFEST, [data])
        self.files.pop(MANIFEST)
        final = os.path.join(self.root, self.name)
        try:
            fsync_dir(self.tmp)
        except OSError as exc:
            raise _storage(self.tmp, "fsync", exc) from exc
        if os.path.lexists(final):
            # Never overwrite a checkpoint: a valid one of this step already exists.
            raise CkptdError(f"checkpoint {final} already exists; not overwriting it")
        try:
            os.rename(self.tmp, final)
        except OSError as exc:
            raise _storage(final, "rename", exc) from exc
        try:
            fsync_dir(self.root)
        except OSError as exc:
            # The rename may not be durable: take the checkpoint back out of sight rather than
            # publish something whose durability a failed fsync left unknown.
            self.tmp = os.path.join(self.root, f"{TRASH_PREFIX}{self.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, self.tmp)
            except OSError:
                self.tmp = final
            raise _storage(self.root, "fsync", exc) from exc
        self.committed_path = final
        return final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # never retried: the page cache state is unknown after a failed fsync
        raise _storage(path, "fsync", exc) from exc


def _close(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        raise _storage(path, "close", exc) from exc


def _write_all(fd: int, buf: memoryview, path: str, pace: Pace | None = None) -> None:
    """Write all of ``buf``; then ``pace(seconds the write took)`` if given."""
    t0 = time.perf_counter()
    while len(buf):
        try:
            n = os.write(fd, buf)
        except InterruptedError:
            continue
        except OSError as exc:
            raise _storage(path, "write", exc) from exc
        if n == 0:
            raise _storage(path, "write", OSError(errno.EIO, "write returned 0 bytes"))
        buf = buf[n:]
    if pace is not None:
        pace(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- reading


@dataclass
class CheckpointInfo:
    """One checkpoint directory as listed (manifest-level check, no checksums)."""

    name: str
    path: str
    step: int
    kind: str = "unknown"
    created: float = 0.0
    bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def epoch(self) -> int | None:
        return self.manifest.get("epoch")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "step": self.step,
            "kind": self.kind,
            "created": self.created,
            "bytes": self.bytes,
            "valid": self.valid,
            "reason": self.reason,
            "metrics": self.metrics,
            "epoch": self.epoch,
        }


def read_small(path: str, limit: int) -> bytes:
    """Read a small regular file (no symlinks) of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(path, "is not a regular file")
        if st.st_size > limit:
            raise CorruptCheckpointError(path, f"is {st.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def read_manifest(path: str) -> dict[str, Any]:
    """Parse and check a checkpoint's manifest (raises CorruptCheckpointError naming the problem)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        raw = read_small(mpath, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, f"{MANIFEST} is missing (incomplete or damaged checkpoint)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptCheckpointError(path, f"{MANIFEST} is a symlink") from None
        raise CorruptCheckpointError(path, f"{MANIFEST} unreadable: {exc.strerror}") from None
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(path, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise CorruptCheckpointError(path, f"{MANIFEST} is not a JSON object")
    if m.get("format") != FORMAT:
        raise CorruptCheckpointError(path, f"{MANIFEST} has format {m.get('format')!r}; this ckptd reads {FORMAT}")
    if m.get("digest") != _digest(m):
        raise CorruptCheckpointError(path, f"{MANIFEST} digest mismatch (the manifest was altered or garbled)")
    files = m.get("files")
    step = m.get("step")
    if not isinstance(files, dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CorruptCheckpointError(path, f"{MANIFEST} lacks a valid step or file list")
    for fname, rec in files.items():
        if not FILE_RE.match(fname) or not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int):
            raise CorruptCheckpointError(path, f"{MANIFEST} lists a bad file entry {fname!r}")
    return m


def check_structure(path: str, manifest: dict[str, Any]) -> None:
    """Every listed file present as a regular file of the listed size; nothing else; no symlinks."""
    expected = set(manifest["files"]) | {MANIFEST}
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        raise CorruptCheckpointError(path, f"cannot list directory: {exc.strerror}") from None
    for e in entries:
        if e.is_symlink():
            raise CorruptCheckpointError(path, f"{e.name} is a symlink; checkpoints never contain symlinks")
        if e.name not in expected:
            raise CorruptCheckpointError(path, f"unexpected entry {e.name} not listed in the manifest")
    present = {e.name: e for e in entries}
    for fname, rec in manifest["files"].items():
        e = present.get(fname)
        if e is None:
            raise CorruptCheckpointError(path, f"{fname} is missing")
        st = e.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(path, f"{fname} is not a regular file")
        if st.st_size != rec["bytes"]:
            raise CorruptCheckpointError(path, f"{fname} is {st.st_size} bytes, manifest says {rec['bytes']} (truncated or altered)")


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Manifest-level check of one checkpoint directory (no checksums)."""
    name = os.path.basename(os.path.normpath(path))
    m_step = NAME_RE.match(name)
    info = CheckpointInfo(name=name, path=path, step=int(m_step.group(1)) if m_step else -1)
    try:
        if os.path.islink(path):
            raise CorruptCheckpointError(path, "the checkpoint directory is a symlink")
        m = read_manifest(path)
        check_structure(path, m)
    except CorruptCheckpointError as exc:
        info.valid, info.reason = False, exc.reason
        return info
    info.manifest = m
    info.step = m["step"]
    info.kind = str(m.get("kind", "unknown"))
    info.created = float(m.get("created", 0.0))
    info.bytes = sum(int(r["bytes"]) for r in m["files"].values())
    info.metrics = dict(m.get("metrics") or {})
    if m_step and int(m_step.group(1)) != info.step:
        info.valid, info.reason = False, f"directory name says step {int(m_step.group(1))}, manifest says {info.step}"
    return info


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``root``, oldest first (ordered by step, then time)."""
    if not os.path.isdir(root):
        raise NotFoundError(f"checkpoint directory {root} does not exist; pass the --dir you trained with")
    out = [inspect_checkpoint(e.path) for e in os.scandir(root) if NAME_RE.match(e.name)]
    out.sort(key=lambda i: (i.step, i.created, i.name))
    return out


def advise_sequential(fd: int) -> None:
    """Ask for sequential readahead: a full verification reads the whole file, in order, in one stream.

    Only SEQUENTIAL: adding WILLNEED for the whole file made cold reads ~10% slower here (the kernel
    queues the entire file at once and small reads, e.g. state.json, wait behind it). Restores use
    read_into instead (two requests in flight).
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass  # advice only


def read_into(fd: int, offset: int, views: Iterable[memoryview], h: Any, path: str) -> int:
    """Fill ``views`` in order from the file's bytes at ``offset``; update ``h`` with them in order.

    Straight into the callers' buffers (tensors), no second copy. READERS requests of ~READ_CHUNK
    bytes each (``preadv``, scattering into several small tensors at once) are in flight, issued in
    file order; this thread hashes each one as soon as it and all before it are in. Two requests in
    flight kept a cold read of this VM's disk steadier than one sequential stream. Returns the
    offset after the last byte read; a file that ends early raises CorruptCheckpointError.
    """
    groups: list[tuple[int, list[memoryview]]] = []
    pos, bufs, size = offset, [], 0
    for mv in views:
        for start in range(0, len(mv), READ_CHUNK):
            piece = mv[start : start + READ_CHUNK]
            bufs.append(piece)
            size += len(piece)
            if size >= READ_CHUNK or len(bufs) >= MAX_IOV:
                groups.append((pos, bufs))
                pos, bufs, size = pos + size, [], 0
    if bufs:
        groups.append((pos, bufs))
        pos += size
    if not groups:
        return pos

    def read_group(off: int, pieces: list[memoryview]) -> None:
        want = sum(len(b) for b in pieces)
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
            for fut, (_, pieces) in zip(futures, groups):
                fut.result()
                for b in pieces:
                    h.update(b)  # releases the GIL: the readers keep going
        finally:
            for fut in futures:
                fut.cancel()
    return pos


def hash_file(path: str, progress: Any = None) -> tuple[int, str]:
    h = new_hasher()
    size = 0
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    advise_sequential(fd)
    try:
        while True:
            n = os.readv(fd, [mv])
            if n == 0:
                break
            h.update(mv[:n])
            size += n
            if progress is not None:
                progress(n)
    finally:
        os.close(fd)
    return size, h.hexdigest()


def verify(path: str, progress: Any = None) -> CheckpointInfo:
    """Full verification: manifest, structure, and every file's checksum."""
    info = inspect_checkpoint(path)
    if not info.valid:
        return info
    for fname, rec in sorted(info.manifest["files"].items()):
        fpath = os.path.join(path, fname)
        try:
            size, digest = hash_file(fpath, progress)
        except OSError as exc:
            info.valid, info.reason = False, f"{fname} unreadable: {exc.strerror}"
            return info
        if size != rec["bytes"]:
            info.valid, info.reason = False, f"{fname} is {size} bytes, manifest says {rec['bytes']}"
            return info
        if digest != rec.get(HASH):
            info.valid, info.reason = False, f"{fname} checksum mismatch (content altered or corrupted)"
            return info
    return info


def latest_valid(root: str) -> CheckpointInfo | None:
    """The newest checkpoint that verifies fully (checksums included), or None."""
    for info in reversed(list_checkpoints(root)):
        if info.valid and verify(info.path).valid:
            return info
    return None


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(f: BinaryIO, path: str, file_size: int) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header with a bounded size; returns (header, data_start)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CorruptCheckpointError(path, "tensor file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(path, f"tensor header length {n} is out of bounds")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(path, f"tensor header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "tensor header is not a JSON object")
    data_len = file_size - 8 - n
    spans = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        offs = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise CorruptCheckpointError(path, f"tensor {key!r} has bad data offsets")
        spans.append((offs[0], offs[1]))
    spans.sort()
    pos = 0
    for a, b in spans:
        if a != pos:
            raise CorruptCheckpointError(path, "tensor data has holes or overlaps")
        pos = b
    if pos != data_len:
        raise CorruptCheckpointError(path, "tensor data does not fill the file")
    return header, 8 + n


def safetensors_header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None = None,
                             align: int = 64) -> bytes:
    """Build the 8-byte length + JSON header for (key, dtype, shape, nbytes) laid out back to back.

    The JSON is padded with spaces (allowed by the format) so the data section starts ``align``-aligned.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % align)
    return struct.pack("<Q", len(body)) + body


# ----------------------------------------------------------------------------- housekeeping


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TMP_RE = re.compile(r"^\.tmp-step-\d+-(.+)-(\d+)-[0-9a-f]{8}$")


def remove_stale_temps(root: str) -> list[str]:
    """Remove temp/trash directories left by writers that are gone (crash, SIGKILL)."""
    removed = []
    if not os.path.isdir(root):
        return removed
    host = socket.gethostname()
    for e in os.scandir(root):
        if e.name.startswith(TRASH_PREFIX):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.name)
            continue
        if not e.name.startswith(TMP_PREFIX):
            continue
        m = _TMP_RE.match(e.name)
        if m and m.group(1) == host:
            pid = int(m.group(2))
            if pid != os.getpid() and _pid_alive(pid):
                continue  # another live writer on this host
        elif time.time() - e.stat(follow_symlinks=False).st_mtime < 3600:
            continue  # another host's writer (shared filesystem) may still be at work
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
        log.info("ckptd: removed leftover temporary directory %s", e.path)
    return removed


def quarantine(root: str, name: str, reason: str) -> str:
    """Move a checkpoint aside into ``.quarantine/`` with the reason recorded; returns the new path."""
    check_name(name)
    qdir = os.path.join(root, QUARANTINE_DIR)
    os.makedirs(qdir, mode=DIR_MODE, exist_ok=True)
    dest = os.path.join(qdir, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
    os.rename(os.path.join(root, name), dest)
    fsync_dir(root)
    note = {"name": name, "reason": reason, "time": time.time()}
    try:
        with open(os.path.join(dest, "QUARANTINE.json"), "w") as f:
            json.dump(note, f, indent=1)
    except OSError:
        pass  # the move is what matters; the note is best effort
    log.warning("ckptd: checkpoint %s is invalid (%s); moved to %s", name, reason, dest)
    return dest


def delete(root: str, name: str) -> bool:
    """Remove a checkpoint: an atomic rename out of sight, then the files. False if already gone."""
    check_name(name)
    src = os.path.join(root, name)
    trash = os.path.join(root, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(src, trash)
    except FileNotFoundError:
        return False
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def pin(root: str, name: str) -> None:
    check_name(name)
    os.makedirs(os.path.join(root, PINS_DIR), mode=DIR_MODE, exist_ok=True)
    with open(os.path.join(root, PINS_DIR, name), "w"):
        pass


def unpin(root: str, name: str) -> None:
    try:
        os.unlink(os.path.join(root, PINS_DIR, check_name(name)))
    except FileNotFoundError:
        pass


def pinned(root: str) -> set[str]:
    try:
        return {n for n in os.listdir(os.path.join(root, PINS_DIR)) if NAME_RE.match(n)}
    except FileNotFoundError:
        return set()


def iter_checkpoint_paths(target: str) -> Iterator[str]:
    """A checkpoint directory itself, or every checkpoint under a root."""
    if os.path.isfile(os.path.join(target, MANIFEST)) or NAME_RE.match(os.path.basename(os.path.normpath(target))):
        yield target
        return
    for info in list_checkpoints(target):
        yield info.path
