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

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import queue
import sys
import threading
import logging
import math
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

from . import origin
from .errors import CkptdError, CorruptCheckpointError, NotFoundError, StorageError

log = logging.getLogger("ckptd")

FORMAT = "ckptd/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
DCP_JSON = "dcp.json"  # a sharded checkpoint's tensor map (ckptd/sharded.py writes it: JSON, never pickled)
MAX_DCP_JSON_BYTES = 256 << 20
SHARD_SEP = "\x1f"  # joins the path of a flattened value in dcp.json (FQNs hold dots)
SHARD_FILE_RE = re.compile(r"^shard-([0-9]{5,})\.bin$")
QUARANTINE_DIR = ".quarantine"
PINS_DIR = ".pins"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
KINDS = ("periodic", "emergency", "manual", "final")
HASH = "xxh3_128"
# Errors of the reading process, not of what it reads: out of descriptors or memory never makes a
# checkpoint "invalid" (the listing fails instead, and the supervisor keeps what it knew).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

NAME_RE = re.compile(r"^step-([0-9]{12,20})$")  # ASCII digits only: \\d also matches e.g. Arabic-Indic digits
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Bounds on what a checkpoint's metadata may hold (README, "On-disk format"): what real checkpoints
# need, with wide headroom, so a damaged or hostile file is refused before it can cost much memory.
MAX_MANIFEST_BYTES = 16 << 20
MAX_MANIFEST_DEPTH = 16  # real: 3 (manifest / metrics / value)
MAX_HEADER_BYTES = 100 << 20  # bound on a safetensors JSON header we are willing to parse
MAX_TENSORS = 500_000  # header entries; ~550 B of Python objects each once parsed (real: thousands)
MAX_DIMS = 64
MAX_KEY_CHARS = 4096
MAX_STATE_BYTES = 256 << 20  # bound on state.json
MAX_STATE_VALUES = 4_000_000  # JSON values in state.json (~50-100 B of Python objects each)
MAX_STATE_DEPTH = 100  # nesting of state.json (real: ~10)
CHUNK = 8 << 20  # buffered write/read/hash granularity
DIRECT_CHUNK = 16 << 20  # O_DIRECT request size (as fast as 64 MiB here; finer steps for pacing)
READ_CHUNK = 16 << 20  # restore read request: small enough that hashing the last one adds little after the read ends
FIRST_READ = 2 << 20  # the first restore read request (see read_into)
READERS = 1  # restore read requests in flight: one stream, hashed behind it (docs/performance.md, P3)
RESTORE_PREFETCH = 32 << 20  # restore starts the disk on this much while it plans (store.Prefetch)
PREFETCH_PIECE = 4 << 20  # Prefetch's request: it stops within one of these once the real read starts
DURING_SWITCH = 0.0002  # seconds: the interpreter's switch interval while read_into's during() runs
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


_PARENT_SYNCED: set[str] = set()


def fsync_parent_once(root: str) -> None:
    """Make ``root``'s own entry durable: fsync its parent once per process.

    A root created by this run (``makedirs`` here or in the supervisor) is an entry of its parent
    that nothing else syncs; without this the first checkpoints can vanish with the whole root on a
    power loss (tests/test_power_loss.py). A parent this process cannot open (a sandbox) is skipped.
    """
    if root in _PARENT_SYNCED:
        return
    try:
        fd = os.open(os.path.dirname(os.path.abspath(root)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _PARENT_SYNCED.add(root)


# ----------------------------------------------------------------------------- writes that never follow a link
#
# ckptd often runs as root over directories other accounts can write: a checkpoint root on a shared file
# system (and its .pins/, .quarantine/), a Prometheus file_sd directory, a run directory whose parent
# another account owns. Every file ckptd creates or replaces there goes through these helpers: the
# directory is opened once (its last component never followed, unless it is the root the user named) and
# checked on that descriptor; everything after is relative to it (openat, renameat, unlinkat); a
# temporary file gets an unpredictable name and is created with O_EXCL|O_NOFOLLOW. A link planted under
# any name, or a directory swapped for a link after the check, can never redirect a write.

DirCheck = Callable[[os.stat_result, str], None]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def private_dir(st: os.stat_result, path: str) -> None:
    """A :data:`DirCheck`: the directory is ours alone (owned by this uid, not writable by group or others)."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, f"{path} is not a private directory of uid {os.geteuid()} (owner uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); ckptd writes nothing into it")


def unshared_dir(st: os.stat_result, path: str) -> None:
    """A :data:`DirCheck`: no other account can write the directory: owned by this uid or root, and writable
    by group or others only when sticky (like /tmp, where nobody can rename or remove another's files)."""
    trusted = (os.geteuid(), 0)
    if st.st_uid not in trusted or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise PermissionError(errno.EPERM, f"{path} is writable by another account (owner uid {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):o}), which could replace what ckptd writes there; use a "
                              f"directory owned by uid {os.geteuid()} or root that only its owner can write "
                              f"(chown; chmod go-w) and give its reader, e.g. Prometheus, read access only")


def open_dir(path: str, *, follow: bool = False, check: DirCheck | None = None) -> int:
    """A descriptor of the directory ``path``; its last component is not followed unless ``follow`` (the root
    a user named may be a link; an entry under it may not). ``check`` runs on the descriptor's stat."""
    try:
        fd = os.open(path, _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise OSError(exc.errno, f"{path} is a symlink; ckptd never writes through a link") from None
        raise
    try:
        if check is not None:
            check(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def subdir_at(dir_fd: int, name: str, path: str, mode: int = DIR_MODE) -> int:
    """A descriptor of the real directory ``name`` under ``dir_fd`` (created if missing); never a link."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, f"{path} is not a plain directory (a symlink or a file); remove it") from None
        raise


def open_at(path: str, flags: int, mode: int = 0o600, *, check: DirCheck | None = None) -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` relative to its directory, opened without following and checked."""
    dir_fd = open_dir(os.path.dirname(path) or ".", check=check)
    try:
        return os.open(os.path.basename(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def replacing_at(dir_fd: int, name: str, mode: int, path: str) -> Iterator[int]:
    """Durably create or replace ``name`` under ``dir_fd`` with what the block writes to the yielded descriptor,
    with exactly ``mode``: a temporary of an unpredictable name (O_EXCL|O_NOFOLLOW), fsync, rename over ``name``
    (a link there is replaced, never followed), fsync the directory. If the block or any step fails, the
    temporary is removed, ``name`` is untouched, and the error (an OSError) is raised."""
    tmp = f".{name}.tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            yield fd
            os.fchmod(fd, mode)
            os.fsync(fd)  # never retried; an OSError (not StorageError) for callers that tolerate their own
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


@contextlib.contextmanager
def replacing(path: str, mode: int = FILE_MODE, *, check: DirCheck | None = None,
              follow_dir: bool = False) -> Iterator[int]:
    """:func:`replacing_at` by path: the directory is opened without following its last component (unless
    ``follow_dir``: a directory the user named, checked by ``check`` on the descriptor)."""
    dir_fd = open_dir(os.path.dirname(path) or ".", follow=follow_dir, check=check)
    try:
        with replacing_at(dir_fd, os.path.basename(path), mode, path) as fd:
            yield fd
    finally:
        os.close(dir_fd)


def replace_file_at(dir_fd: int, name: str, data: bytes, mode: int, path: str) -> None:
    """:func:`replacing_at` with ``data`` as the whole content."""
    with replacing_at(dir_fd, name, mode, path) as fd:
        write_fully(fd, data)


def replace_file(path: str, data: bytes, mode: int = FILE_MODE, *, check: DirCheck | None = None,
                 follow_dir: bool = False) -> None:
    """:func:`replacing` with ``data`` as the whole content."""
    with replacing(path, mode, check=check, follow_dir=follow_dir) as fd:
        write_fully(fd, data)


def write_fully(fd: int, data: bytes | memoryview) -> None:
    """All of ``data`` to ``fd`` (OSError on failure; a write of 0 bytes is ENOSPC)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.ENOSPC, "write returned 0 bytes")
        view = view[n:]


def unlink_at(path: str, *, check: DirCheck | None = None) -> bool:
    """Remove the entry ``path`` (a link itself, never its target) relative to its checked directory; False
    when it was not there."""
    dir_fd = open_dir(os.path.dirname(path) or ".", check=check)
    try:
        os.unlink(os.path.basename(path), dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)


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

    @classmethod
    def join(cls, root: str, step: int, tmp: str) -> PendingCheckpoint:
        """Another rank's view of a checkpoint being written: its files go into ``tmp`` (created by the
        rank that commits); this object never commits nor removes it."""
        self = cls.__new__(cls)
        self.root, self.step, self.name = root, step, checkpoint_name(step)
        self.files, self.committed_path = {}, None
        if os.path.dirname(os.path.abspath(tmp)) != os.path.abspath(root) or \
                not os.path.basename(tmp).startswith(f"{TMP_PREFIX}{self.name}-"):
            raise CkptdError(f"{tmp} is not a temporary directory of {self.name} in {root}")
        self.tmp = tmp
        self._joined = True
        return self

    def add_file(self, name: str, rec: FileRecord) -> None:
        """List a file another rank wrote (and fsynced) into this directory; checked before the commit."""
        check_name(name)
        try:
            st = os.lstat(os.path.join(self.tmp, name))
        except OSError as exc:
            raise _storage(os.path.join(self.tmp, name), "stat", exc) from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != rec.bytes:
            raise CkptdError(f"{os.path.join(self.tmp, name)} is not the {rec.bytes}-byte file its writer reported")
        self.files[name] = rec

    def __enter__(self) -> PendingCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed_path is None and not getattr(self, "_joined", False):
            self.abort()

    def _create(self, name: str, extra_flags: int) -> int:
        """Create ``name`` in the temporary directory, relative to a descriptor of it opened without following
        a link: the directory may sit in a root another account can write, which could swap it for a link."""
        dir_fd = os.open(self.tmp, _DIR_FLAGS | os.O_NOFOLLOW)
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | extra_flags,
                           FILE_MODE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _unlink(self, name: str) -> None:
        dir_fd = os.open(self.tmp, _DIR_FLAGS | os.O_NOFOLLOW)
        try:
            os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

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
            fd = self._create(name, 0)
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
        try:
            fd = self._create(name, direct)
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
                self._unlink(name)
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

    def commit(self, *, kind: str, metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
               replace: bool = False) -> str:
        """Write the manifest and publish the checkpoint under its final name. Returns its path.

        ``replace``: a checkpoint of this step that exists is swapped out in one atomic rename
        (``renameat2(RENAME_EXCHANGE)``) and removed once the swap is durable (the state at ``close()``,
        when work after the step's save changed it); where the file system cannot swap, a CkptdError
        says so and the existing checkpoint stays.
        """
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
            if replace and not os.path.islink(final):
                return self._exchange(final)
            # Never overwrite a checkpoint: a valid one of this step already exists.
            raise CkptdError(f"checkpoint {final} already exists; not overwriting it")
        try:
            os.rename(self.tmp, final)
        except OSError as exc:
            raise _storage(final, "rename", exc) from exc
        try:
            fsync_dir(self.root)
            fsync_parent_once(self.root)
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

    def _exchange(self, final: str) -> str:
        """Swap the complete temporary directory with the checkpoint of the same step, atomically; the old
        one, now under the temporary name, is removed after the swap is durable (if the writer dies first,
        remove_stale_temps removes it: its name is a dead writer's temp)."""
        try:
            rename_exchange(self.tmp, final)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise CkptdError(f"checkpoint {final} already exists and this file system cannot replace it "
                                 f"atomically ({exc.strerror}); it is kept") from None
            raise _storage(final, "rename", exc) from exc
        try:
            fsync_dir(self.root)
        except OSError as exc:
            try:  # durability unknown: put the old checkpoint back under its name
                rename_exchange(self.tmp, final)
            except OSError:
                pass
            raise _storage(self.root, "fsync", exc) from exc
        self.committed_path = final
        _remove_tree(self.root, os.path.basename(self.tmp))
        return final


RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def rename_exchange(a: str, b: str) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); OSError(ENOSYS) where unavailable."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", a)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


def amend_manifest(path: str, *, metrics: dict[str, Any] | None = None, finished: bool | None = None) -> CheckpointInfo:
    """Add ``metrics`` to a committed checkpoint's manifest (new keys win) and/or mark it ``finished``.

    The checkpoint's data files are never touched: a new manifest (new digest) is written to a temporary
    file in the root, fsynced, renamed over the old one, and the checkpoint's directory fsynced. A reader
    sees the old manifest or the new one, both valid. Raises CorruptCheckpointError when the checkpoint does
    not pass the manifest-level check, StorageError when a write fails (the old manifest then stays).
    """
    info = inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    m = {k: v for k, v in info.manifest.items() if k != "digest"}
    if metrics:
        m["metrics"] = {**(m.get("metrics") or {}), **metrics}
    if finished is not None:
        m["finished"] = finished
    if all(info.manifest.get(k) == v for k, v in m.items()):
        return info  # nothing to record (already finished, the same metrics): no rewrite
    problem = _manifest_problem(m)
    if problem:
        raise CkptdError(f"cannot record that in {path}: the manifest {problem}")
    m["digest"] = _digest(m)
    data = json.dumps(m, indent=1, sort_keys=True, allow_nan=False).encode()
    if len(data) > MAX_MANIFEST_BYTES:
        raise CkptdError(f"cannot record that in {path}: the manifest would exceed {MAX_MANIFEST_BYTES} bytes")
    root = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(root, f"{TMP_PREFIX}{info.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise _storage(tmp, "create", exc) from exc
    try:
        try:
            _write_all(fd, memoryview(data), tmp)
            _fsync(fd, tmp)
        finally:
            _close(fd, tmp)
        try:  # into the checkpoint's directory by a descriptor opened without following a link
            ckpt_fd = open_dir(path)
            try:
                os.rename(tmp, MANIFEST, dst_dir_fd=ckpt_fd)
            finally:
                os.close(ckpt_fd)
        except OSError as exc:
            raise _storage(os.path.join(path, MANIFEST), "rename", exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        fsync_dir(path)
        fsync_dir(root)
    except OSError as exc:
        raise _storage(path, "fsync", exc) from exc
    return inspect_checkpoint(path)


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

    @property
    def origin(self) -> dict[str, Any] | None:
        """What started the run that wrote it (origin.py); None in checkpoints of older versions."""
        return self.manifest.get("origin")

    @property
    def finished(self) -> bool:
        """The last checkpoint of a run whose script called ``close()`` after its last step."""
        return self.manifest.get("finished") is True

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
            "finished": self.finished,
            "origin": self.origin,
        }


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a regular file (no symlinks) at ``offset``; CorruptCheckpointError when it ends early."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(path, "is not a regular file")
    try:
        if length < 0 or offset < 0 or offset + length > os.fstat(fd).st_size:
            raise CorruptCheckpointError(path, f"no {length} bytes at offset {offset} (truncated or altered)")
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_small(path: str, limit: int) -> bytes:
    """Read a small regular file (no symlinks; a FIFO is refused, not waited on) of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_bounds_problem(raw: bytes, max_depth: int, max_values: int) -> str:
    """Why ``raw`` is too deep or holds too many values to parse (``""`` when within bounds).

    A cheap scan (C-speed regex and bytes methods) before ``json.loads``: parsing a deeply nested
    document overflows the stack, and a document of many tiny values (``[[],[],...]``) costs 20-50x
    its size in Python objects. Counts are upper bounds (separators inside strings are not counted;
    values are counted by their separators).
    """
    bare = _JSON_STRING.sub(b'""', raw)
    brackets = bare.translate(None, _NOT_BRACKET)
    values = bare.count(b",") + len(brackets) // 2 + 1
    if values > max_values:
        return f"holds about {values} JSON values, more than the {max_values} allowed"
    depth = 0
    while brackets:
        inner = _JSON_PAIR.sub(b"", brackets)  # removes exactly one nesting level
        if len(inner) == len(brackets):
            return "has unbalanced brackets (not valid JSON)"
        depth += 1
        if depth > max_depth:
            return f"is nested more than {max_depth} levels deep"
        brackets = inner
    return ""


def load_json(raw: bytes, path: str, what: str, max_depth: int, max_values: int) -> Any:
    """``json.loads`` of checkpoint metadata within bounds; CorruptCheckpointError naming ``what`` otherwise."""
    problem = json_bounds_problem(raw, max_depth, max_values)
    if problem:
        raise CorruptCheckpointError(path, f"{what} {problem}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"{what} is not valid JSON ({exc})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _manifest_problem(m: dict[str, Any]) -> str:
    """The first field of a parsed manifest whose type or value is wrong (``""`` when all are right).

    Every field any ckptd code reads is checked here, so listing, retention and the commands can use
    them without further checks.
    """
    step = m.get("step")
    if not _is_int(step) or not 0 <= step < 10**20:
        return f"step {step!r} is not a non-negative integer"
    if m.get("kind") not in KINDS:
        return f"kind {m.get('kind')!r} is not one of {', '.join(KINDS)}"
    created = m.get("created")
    if not _is_number(created) or created < 0:
        return f"created {created!r} is not a time in seconds"
    if m.get("hash") != HASH:
        return f"hash {m.get('hash')!r} is not {HASH}"
    files = m.get("files")
    if not isinstance(files, dict):
        return "lacks a valid file list"
    for fname, rec in files.items():
        if not (FILE_RE.match(fname) and fname != MANIFEST and isinstance(rec, dict) and _is_int(rec.get("bytes"))
                and rec["bytes"] >= 0 and isinstance(rec.get(HASH), str) and _HEX32.match(rec[HASH])):
            return f"lists a bad file entry {fname!r}"
    metrics = m.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            v is None or isinstance(v, (str, bool)) or _is_number(v) for v in metrics.values()):
        return "metrics is not an object of numbers, strings, booleans or nulls"
    epoch = m.get("epoch")
    if epoch is not None and not _is_int(epoch):
        return f"epoch {epoch!r} is not an integer"
    versions = m.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        return "versions is not an object of strings"
    if not isinstance(m.get("run_id", ""), str):
        return "run_id is not a string"
    if "origin" in m:
        why = origin.problem(m["origin"])
        if why:
            return f"origin {why}"
    if not isinstance(m.get("finished", False), bool):
        return "finished is not true or false"
    return ""


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
        if exc.errno in RESOURCE_ERRNOS:
            raise  # the reader's own trouble, not the checkpoint's
        raise CorruptCheckpointError(path, f"{MANIFEST} unreadable: {exc.strerror}") from None
    m = load_json(raw, path, MANIFEST, MAX_MANIFEST_DEPTH, MAX_MANIFEST_BYTES)
    if not isinstance(m, dict):
        raise CorruptCheckpointError(path, f"{MANIFEST} is not a JSON object")
    if m.get("format") != FORMAT:
        raise CorruptCheckpointError(path, f"{MANIFEST} has format {m.get('format')!r}; this ckptd reads {FORMAT}")
    try:
        digest_ok = m.get("digest") == _digest(m)
    except (TypeError, ValueError):
        digest_ok = False
    if not digest_ok:
        raise CorruptCheckpointError(path, f"{MANIFEST} digest mismatch (the manifest was altered or garbled)")
    problem = _manifest_problem(m)
    if problem:
        raise CorruptCheckpointError(path, f"{MANIFEST} {problem}")
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
    """Manifest-level check of one checkpoint directory (no checksums). Never raises on its content:
    whatever is wrong with it is reported as ``valid=False`` with the ``reason``."""
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
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise  # out of descriptors or memory says nothing about the checkpoint: the caller's listing fails
        info.valid, info.reason = False, f"unreadable: {exc.strerror or exc}"
        return info
    info.manifest = m
    info.step = m["step"]
    info.kind = m["kind"]
    info.created = float(m["created"])
    info.bytes = sum(r["bytes"] for r in m["files"].values())
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
    read_into instead (one request in flight, see there).
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass  # advice only


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
            for fut, (_, pieces) in zip(futures, groups):
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


def shard_file(rank: int) -> str:
    """A sharded checkpoint's file of one rank's shards."""
    return f"shard-{rank:05d}.bin"


def read_dcp_json(path: str) -> Any:
    """A sharded checkpoint's ``dcp.json``, parsed within bounds (OSError when it cannot be read)."""
    raw = read_small(os.path.join(path, DCP_JSON), MAX_DCP_JSON_BYTES)
    return load_json(raw, path, DCP_JSON, 8, MAX_DCP_JSON_BYTES)


def _dims_ok(v: Any, n: int | None = None) -> bool:
    return (isinstance(v, list) and len(v) <= MAX_DIMS and (n is None or len(v) == n)
            and all(_is_int(d) and d >= 0 for d in v))


def _volume(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def dcp_problem(doc: Any, files: dict[str, Any]) -> str:
    """Why a sharded checkpoint's ``dcp.json`` does not describe exactly the bytes of its shard files (``""``
    when it does). ``files``: the manifest's file list (name -> {"bytes": N, ...}).

    Every size is checked against bytes that exist before anything is allocated from it (export, restore):
    each tensor's chunks lie inside its shape and add up to all of it; each chunk has exactly one storage entry,
    whose length is the chunk's bytes; and the entries of each shard file tile it, without holes or overlaps.
    So a tensor can never claim more memory than the shard files hold (a 116-byte map claiming 2**40 elements
    with no storage is refused here)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict) or not isinstance(doc.get("storage"), list):
        return "has no tensors/storage"
    chunks: dict[tuple[str, int], int] = {}  # (fqn, chunk index) -> bytes the chunk needs
    for fqn, m in doc["tensors"].items():
        if not (isinstance(m, dict) and m.get("dtype") in DTYPE_SIZES and _dims_ok(m.get("size"))
                and isinstance(m.get("chunks"), list)):
            return f"tensor {fqn[:80]!r} lacks a valid dtype, size or chunks"
        size, covered = m["size"], 0
        for i, c in enumerate(m["chunks"]):
            if not (isinstance(c, list) and len(c) == 2 and _dims_ok(c[0], len(size)) and _dims_ok(c[1], len(size))
                    and all(o + n <= d for o, n, d in zip(c[0], c[1], size))):
                return f"tensor {fqn[:80]!r} has a chunk outside its shape {size}"
            chunks[(fqn, i)] = _volume(c[1]) * DTYPE_SIZES[m["dtype"]]
            covered += _volume(c[1])
        if covered != _volume(size):
            return (f"tensor {fqn[:80]!r} of shape {size} is not covered by its chunks ({covered} of "
                    f"{_volume(size)} elements stored)")
    spans: dict[str, list[tuple[int, int]]] = {}
    for entry in doc["storage"]:
        ok = isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], list) and len(entry[0]) == 3
        index, fname, offset, length = entry if ok else (None, None, None, None)
        key = (index[0], index[2]) if ok and isinstance(index[0], str) and _is_int(index[2]) else None
        if key is None or key not in chunks or not isinstance(fname, str) or fname not in files \
                or not SHARD_FILE_RE.match(fname) or not _dims_ok([offset, length]) or chunks[key] != length:
            return f"storage entry {str(entry)[:80]} is not one chunk of a listed tensor in a listed shard file"
        del chunks[key]  # each chunk stored once
        spans.setdefault(fname, []).append((offset, length))
    if chunks:
        fqn, i = next(iter(chunks))
        return f"chunk {i} of tensor {fqn[:80]!r} has no storage"
    for fname, rec in files.items():
        if not SHARD_FILE_RE.match(fname):
            continue
        pos = 0
        for offset, length in sorted(spans.get(fname, [])):
            if offset != pos:
                return f"the chunks of {fname} leave holes or overlap (at offset {offset})"
            pos += length
        if pos != rec["bytes"]:
            return f"the chunks of {fname} hold {pos} bytes, the file {rec['bytes']}"
    return ""


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
    """Full verification: manifest, structure, every file's checksum, and the metadata parsed
    and checked as ``restore()`` does (tensor header, bounds of ``state.json``)."""
    info = inspect_checkpoint(path)
    if not info.valid:
        return info
    for fname, rec in sorted(info.manifest["files"].items()):
        fpath = os.path.join(path, fname)
        try:
            size, digest = hash_file(fpath, progress)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise
            info.valid, info.reason = False, f"{fname} unreadable: {exc.strerror}"
            return info
        if size != rec["bytes"]:
            info.valid, info.reason = False, f"{fname} is {size} bytes, manifest says {rec['bytes']}"
            return info
        if digest != rec.get(HASH):
            info.valid, info.reason = False, f"{fname} checksum mismatch (content altered or corrupted)"
            return info
    try:
        check_metadata(path, info.manifest)
    except CorruptCheckpointError as exc:
        info.valid, info.reason = False, exc.reason
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise
        info.valid, info.reason = False, f"unreadable: {exc.strerror or exc}"
    return info


def check_metadata(path: str, manifest: dict[str, Any]) -> None:
    """The checks restore makes on a checkpoint's metadata beyond checksums (raises CorruptCheckpointError)."""
    files = manifest["files"]
    if TENSORS in files:
        tpath = os.path.join(path, TENSORS)
        with open(tpath, "rb", buffering=0, opener=_open_nofollow) as f:
            size = os.fstat(f.fileno()).st_size
            read_safetensors_header(f, tpath, size)
    if STATE in files:
        raw = read_small(os.path.join(path, STATE), MAX_STATE_BYTES)
        problem = json_bounds_problem(raw, MAX_STATE_DEPTH, MAX_STATE_VALUES)
        if problem:
            raise CorruptCheckpointError(path, f"{STATE} {problem}")
    if DCP_JSON in files:
        problem = dcp_problem(read_dcp_json(path), files)
        if problem:
            raise CorruptCheckpointError(path, f"{DCP_JSON} does not describe the shard files: {problem}")


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def latest_valid(root: str) -> CheckpointInfo | None:
    """The newest checkpoint that verifies fully (checksums included), or None."""
    for info in reversed(list_checkpoints(root)):
        if info.valid and verify(info.path).valid:
            return info
    return None


# ----------------------------------------------------------------------------- safetensors


# safetensors dtype name -> element size; the names ckptd writes (state.DTYPES maps torch dtypes to them)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked: known dtype, shape matching its byte span."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the data section
    end: int


def read_header_bytes(f: BinaryIO, path: str, file_size: int) -> tuple[bytes, bytes]:
    """The 8-byte length and the JSON header of a safetensors file, bounded; ``f`` must be at offset 0."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CorruptCheckpointError(path, "tensor file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(path, f"tensor header length {n} is out of bounds "
                                           f"(file {file_size} bytes, at most {MAX_HEADER_BYTES} allowed)")
    body = f.read(n)
    if len(body) != n:
        raise CorruptCheckpointError(path, "tensor file ends inside its header (truncated)")
    return raw, body


def parse_safetensors_header(body: bytes, path: str, data_len: int) -> tuple[dict[str, Any], list[TensorEntry]]:
    """Check a safetensors JSON header completely; returns (header, entries in file order).

    Every entry needs exactly ``dtype`` (a known name), ``shape`` (a list of at most MAX_DIMS
    non-negative ints) and ``data_offsets`` whose span is exactly the shape's bytes; together the
    spans tile the data section (``data_len`` bytes) without holes or overlaps. So nothing in a
    header that passes can make a reader allocate more than the file holds.
    """
    if body.count(b"{") > MAX_TENSORS + 2:  # every entry is an object: refuse before parsing
        raise CorruptCheckpointError(path, f"tensor header holds more than the {MAX_TENSORS} tensors allowed")
    header = load_json(body, path, "tensor header", 4, MAX_TENSORS * 16)
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "tensor header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError(path, "tensor header __metadata__ is not an object of strings")
    entries = []
    for key, rec in header.items():
        if key == "__metadata__":
            continue
        entries.append(_tensor_entry(key, rec, path, data_len))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:
        if e.start != pos:
            raise CorruptCheckpointError(path, f"tensor data has holes or overlaps (at tensor {e.key!r})")
        pos = e.end
    if pos != data_len:
        raise CorruptCheckpointError(path, f"tensor data does not fill the file ({pos} of {data_len} bytes)")
    return header, entries


def _tensor_entry(key: str, rec: Any, path: str, data_len: int) -> TensorEntry:
    if len(key) > MAX_KEY_CHARS:
        raise CorruptCheckpointError(path, f"tensor name of {len(key)} characters is too long")
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(path, f"tensor {key!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        raise CorruptCheckpointError(path, f"tensor {key!r} has a bad shape {str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_len):
        raise CorruptCheckpointError(path, f"tensor {key!r} has bad data offsets")
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if nbytes != offs[1] - offs[0]:
        raise CorruptCheckpointError(path, f"tensor {key!r}: shape {shape} of {dtype} is {nbytes} bytes, "
                                           f"its data span is {offs[1] - offs[0]}")
    return TensorEntry(key, dtype, tuple(shape), offs[0], offs[1])


def read_safetensors_header(f: BinaryIO, path: str, file_size: int) -> tuple[dict[str, Any], int]:
    """Read and check a safetensors header (see :func:`parse_safetensors_header`); returns (header, data_start)."""
    _, body = read_header_bytes(f, path, file_size)
    header, _ = parse_safetensors_header(body, path, file_size - 8 - len(body))
    return header, 8 + len(body)


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
    # A zombie (exited, not yet reaped: an orphaned trainer under a PID 1 that does not reap) writes nothing more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rfind(b")") + 2 : st.rfind(b")") + 3] != b"Z"
    except OSError:
        return True


_TMP_RE = re.compile(r"^\.tmp-step-[0-9]+-(.+)-([0-9]+)-[0-9a-f]{8}$")


def _remove_tree(root: str, name: str) -> None:
    """Remove ``root/name`` without following a symlink: a link is unlinked, never entered."""
    path = os.path.join(root, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # fd-based on Linux: never follows links inside
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_stale_temps(root: str) -> list[str]:
    """Remove temp/trash directories left by writers that are gone (crash, SIGKILL)."""
    removed = []
    if not os.path.isdir(root):
        return removed
    host = socket.gethostname()
    for e in os.scandir(root):
        if e.name.startswith(TRASH_PREFIX):
            _remove_tree(root, e.name)
            removed.append(e.name)
            continue
        if not e.name.startswith(TMP_PREFIX):
            continue
        m = _TMP_RE.match(e.name)
        try:
            if m and m.group(1) == host:
                pid = int(m.group(2))
                if pid != os.getpid() and _pid_alive(pid):
                    continue  # another live writer on this host
            elif time.time() - e.stat(follow_symlinks=False).st_mtime < 3600:
                continue  # another host's writer (shared filesystem) may still be at work
        except FileNotFoundError:
            continue  # its writer finished or another process removed it
        _remove_tree(root, e.name)
        removed.append(e.name)
        log.info("ckptd: removed leftover temporary directory %s", e.path)
    return removed


PREVIOUS_DIR = ".previous"  # `ckptd run --fresh` moves an old run's checkpoints here, never deletes them


def live_writer(root: str) -> str:
    """Why ``root`` is being written by a process of its own (a live writer's temporary directory), or ""."""
    host = socket.gethostname()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return ""
    for e in entries:
        m = _TMP_RE.match(e.name)
        if not m:
            continue
        try:
            if m.group(1) == host:
                if int(m.group(2)) != os.getpid() and _pid_alive(int(m.group(2))):
                    return f"process {m.group(2)} is writing a checkpoint into {root} ({e.name})"
            elif time.time() - e.stat(follow_symlinks=False).st_mtime < 3600:
                return f"a process on host {m.group(1)} is writing a checkpoint into {root} ({e.name})"
        except FileNotFoundError:
            continue
    return ""


def move_aside(root: str, label: str) -> tuple[str, list[str]]:
    """Move every checkpoint of ``root`` (valid or not) and its pins into ``root/.previous/LABEL-TIME/``.

    Renames only (nothing is copied or deleted); each rename is made durable by fsyncing both directories.
    Returns (the new directory, the moved names). A symlink is moved as a link, never followed.
    """
    check_name(label)
    prev = os.path.join(root, PREVIOUS_DIR)
    dest = os.path.join(prev, f"{label}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}")
    names = sorted(e.name for e in os.scandir(root) if NAME_RE.match(e.name) or e.name == PINS_DIR)
    try:  # relative to descriptors opened without following a link (a linked .previous is refused)
        root_fd = open_dir(root, follow=True)
        try:
            prev_fd = subdir_at(root_fd, PREVIOUS_DIR, prev)
            try:
                dest_fd = subdir_at(prev_fd, os.path.basename(dest), dest)
                try:
                    os.fsync(prev_fd)
                    os.fsync(root_fd)
                    for name in names:
                        os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=dest_fd)
                    os.fsync(dest_fd)
                    os.fsync(root_fd)
                finally:
                    os.close(dest_fd)
            finally:
                os.close(prev_fd)
        finally:
            os.close(root_fd)
    except OSError as exc:
        raise _storage(dest, "move aside", exc) from exc
    return dest, names


def _open_dir_nofollow(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def quarantine(root: str, name: str, reason: str) -> str | None:
    """Move a checkpoint aside into ``.quarantine/`` with the reason recorded; returns the new path.

    Never follows a symlink: the entry is renamed as it is (a link moves as a link), and the note
    ``QUARANTINE.json`` is created relative to directory fds opened with O_NOFOLLOW, inside the
    moved directory, or next to it (``NAME-TIME.QUARANTINE.json``) when the entry is not a real
    directory. Returns None when the checkpoint is already gone (another process moved it first), or when
    ``.quarantine`` is not a plain directory (a file or a link: said once per root; the checkpoint is left in
    place, where every reader already skips it).
    """
    check_name(name)
    dest_name = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(QUARANTINE_DIR, DIR_MODE, dir_fd=root_fd)
        except FileExistsError:
            pass
        try:
            q_fd = _open_dir_nofollow(QUARANTINE_DIR, root_fd)
        except OSError as exc:
            # The checkpoint stays where it is (it is still invalid, and every reader skips it): a restore goes
            # on to the next older one rather than failing for want of a place to move it.
            _warn_once(("quarantine", os.path.abspath(root)),
                       "ckptd: %s is not a plain directory (%s): invalid checkpoints are skipped but not moved "
                       "aside; remove it (ckptd recreates it)", os.path.join(root, QUARANTINE_DIR),
                       "a symlink" if exc.errno == errno.ELOOP else exc.strerror)
            log.warning("ckptd: checkpoint %s is invalid (%s); left in place", name, reason)
            return None
        try:
            try:
                os.rename(name, dest_name, src_dir_fd=root_fd, dst_dir_fd=q_fd)
            except FileNotFoundError:
                log.info("ckptd: checkpoint %s was already moved or removed by another process", name)
                return None
            os.fsync(root_fd)
            os.fsync(q_fd)
            _write_note(q_fd, dest_name, {"name": name, "reason": reason, "time": time.time()})
        finally:
            os.close(q_fd)
    finally:
        os.close(root_fd)
    dest = os.path.join(root, QUARANTINE_DIR, dest_name)
    log.warning("ckptd: checkpoint %s is invalid (%s); moved to %s", name, reason, dest)
    return dest


_WARNED: set[Any] = set()


def _warn_once(key: Any, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _write_note(q_fd: int, dest_name: str, note: dict[str, Any]) -> None:
    """Best effort (the move is what matters): QUARANTINE.json inside the moved directory, never through a link."""
    data = json.dumps(note, indent=1).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            d_fd = _open_dir_nofollow(dest_name, q_fd)
        except OSError:  # a symlink or a file posing as a checkpoint: the note goes beside it
            d_fd, fname = q_fd, f"{dest_name}.QUARANTINE.json"
        else:
            fname = "QUARANTINE.json"
        try:
            fd = os.open(fname, flags, FILE_MODE, dir_fd=d_fd)
            try:
                _write_all(fd, memoryview(data), fname)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            if d_fd != q_fd:
                os.close(d_fd)
    except (OSError, CkptdError):
        pass


def delete(root: str, name: str) -> bool:
    """Remove a checkpoint: an atomic rename out of sight, then the files. False if already gone.

    The rename moves a symlink as a link; the removal never follows one."""
    check_name(name)
    src = os.path.join(root, name)
    trash_name = f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(src, os.path.join(root, trash_name))
    except FileNotFoundError:
        return False
    fsync_dir(root)
    _remove_tree(root, trash_name)
    return True


def pin(root: str, name: str) -> None:
    """Create ``root/.pins/NAME`` (durably); never through a symlink (the supervisor may run as root over a
    directory other accounts can write): a ``.pins`` or a pin that is a link is refused (OSError naming it)."""
    check_name(name)
    root_fd = open_dir(root, follow=True)
    try:
        pins_fd = subdir_at(root_fd, PINS_DIR, os.path.join(root, PINS_DIR))
        try:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE,
                             dir_fd=pins_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OSError(exc.errno, f"{os.path.join(root, PINS_DIR, name)} is a symlink, not a pin; "
                                  "remove it and pin again") from None
                raise
            os.close(fd)
            # Durable before we say so: a pin lost to a power loss lets retention delete what it protected.
            os.fsync(pins_fd)
        finally:
            os.close(pins_fd)
        os.fsync(root_fd)
    finally:
        os.close(root_fd)


def unpin(root: str, name: str) -> None:
    check_name(name)
    try:
        unlink_at(os.path.join(root, PINS_DIR, name))
    except FileNotFoundError:
        pass  # no .pins/ at all


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
