"""Durable writes: the one home of fsync, atomic replacement and the no-follow helpers, and the checkpoint commit.

Everything ckptd writes to disk goes through here: checkpoint files (:class:`PendingCheckpoint`), and, through
:func:`replace_file` / :func:`replacing`, :func:`open_at`, :func:`unlink_at` and :func:`fsync_dir`, every other
file (pins and quarantine notes here in the store, the supervisor's journal and state, install-unit's units,
the benchmarks' results).

Commit protocol: write into a temporary directory in the same root, fsync every
file, write the manifest last, fsync it, fsync the temp directory, rename it to
its final name, fsync the root. Any storage error aborts: the temp directory is
removed, nothing is published, the error names the path and the cause, and no
fsync is ever retried.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import CkptdError, StorageError
from .auth import MAC_FIELD, Key
from .format import ALIGN, FORMAT, HASH, KINDS, Hashes, encode_manifest, manifest_digest, sign_manifest
from .layout import CHUNK, DIR_MODE, FILE_MODE, MANIFEST, TMP_PREFIX, check_name, checkpoint_name, temp_name, trash_name

DIRECT_CHUNK = 16 << 20  # O_DIRECT request size (as fast as 64 MiB here; finer steps for pacing)
Pace = Callable[[float], None]
"""Called by the writers after each piece with the seconds it took; a background save sleeps
there to leave the disk and memory bandwidth to the training loop (Checkpointer(pace=...))."""


# ----------------------------------------------------------------------------- fsync and storage errors


def fsync_dir(path: str) -> None:
    """fsync a directory by its path: what was created, renamed or removed in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
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


# The checkpoint writer's own I/O: an OSError becomes a StorageError naming the path and the operation.


def storage_error(path: str, op: str, exc: OSError) -> StorageError:
    return StorageError(path, op, exc)


def storage_fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # never retried: the page cache state is unknown after a failed fsync
        raise storage_error(path, "fsync", exc) from exc


def storage_close(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        raise storage_error(path, "close", exc) from exc


def storage_write(fd: int, buf: memoryview, path: str, pace: Pace | None = None) -> None:
    """Write all of ``buf``; then ``pace(seconds the write took)`` if given."""
    t0 = time.perf_counter()
    while len(buf):
        try:
            n = os.write(fd, buf)
        except InterruptedError:
            continue
        except OSError as exc:
            raise storage_error(path, "write", exc) from exc
        if n == 0:
            raise storage_error(path, "write", OSError(errno.EIO, "write returned 0 bytes"))
        buf = buf[n:]
    if pace is not None:
        pace(time.perf_counter() - t0)


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


def remove_tree(root: str, name: str) -> None:
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


# ----------------------------------------------------------------------------- writing a checkpoint


def lower_thread_priority(nice: int = 10) -> None:
    """Let the training thread win the CPU over background checkpoint work (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass


class HashPipe:
    """xxh3-128 (and, with a key, the keyed BLAKE3 of the same bytes: :class:`format.Hashes`) computed in a
    helper thread while the caller writes or reads the same bytes.

    xxhash, blake3 and the I/O all release the GIL, so hashing costs no wall time as long as it is
    faster than the disk (xxh3 is several GB/s per core; keyed BLAKE3 spreads a large piece over the
    cores). Feed views in file order.
    """

    def __init__(self, key: Key | None = None) -> None:
        self._h = Hashes(key)
        self._q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name="ckptd-hash", daemon=True)
        self._t.start()

    def _run(self) -> None:
        lower_thread_priority()
        while (mv := self._q.get()) is not None:
            self._h.update(mv)

    def feed(self, data: bytes | memoryview) -> None:
        self._q.put(memoryview(data))

    def finish(self) -> Hashes:
        """Wait for every piece fed; the hashes of them all."""
        self._q.put(None)
        self._t.join()
        return self._h

    def hexdigest(self) -> str:
        return self.finish().hexdigest()


def is_aligned(mv: memoryview) -> bool:
    """Whether a writable buffer starts on an ALIGN boundary (O_DIRECT needs it); read-only ones never qualify."""
    if not len(mv):
        return True
    return not mv.readonly and ctypes.addressof(ctypes.c_char.from_buffer(mv)) % ALIGN == 0


@dataclass
class FileRecord:
    bytes: int
    xxh3_128: str
    mac: str | None = None  # keyed BLAKE3, when the checkpoint is written with a key

    def as_json(self) -> dict[str, Any]:
        """The file's record in the manifest."""
        out: dict[str, Any] = {"bytes": self.bytes, HASH: self.xxh3_128}
        if self.mac is not None:
            out[MAC_FIELD] = self.mac
        return out


class PendingCheckpoint:
    """A checkpoint being written in a temporary directory of the root.

    Use as a context manager: leaving the block without :meth:`commit` (an
    exception, a storage error) removes the temporary directory.
    """

    _joined = False  # another rank's view (join): never commits nor removes the directory

    def __init__(self, root: str, step: int, key: Key | None = None) -> None:
        self.root = root
        self.step = step
        self.key = key  # with a key every file gets its MAC and the manifest is authenticated
        self.name = checkpoint_name(step)
        self.files: dict[str, FileRecord] = {}
        self.committed_path: str | None = None
        os.makedirs(root, mode=DIR_MODE, exist_ok=True)
        self.tmp = os.path.join(root, temp_name(self.name))
        try:
            os.mkdir(self.tmp, DIR_MODE)
        except OSError as exc:
            raise storage_error(self.tmp, "mkdir", exc) from exc

    @classmethod
    def join(cls, root: str, step: int, tmp: str, key: Key | None = None) -> PendingCheckpoint:
        """Another rank's view of a checkpoint being written: its files go into ``tmp`` (created by the
        rank that commits); this object never commits nor removes it."""
        self = cls.__new__(cls)
        self.root, self.step, self.name, self.key = root, step, checkpoint_name(step), key
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
            raise storage_error(os.path.join(self.tmp, name), "stat", exc) from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != rec.bytes:
            raise CkptdError(f"{os.path.join(self.tmp, name)} is not the {rec.bytes}-byte file its writer reported")
        self.files[name] = rec

    def __enter__(self) -> PendingCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed_path is None and not self._joined:
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
        h = Hashes(self.key)
        size = 0
        try:
            fd = self._create(name, 0)
        except OSError as exc:
            raise storage_error(path, "open", exc) from exc
        try:
            for chunk in chunks:
                mv = memoryview(chunk).cast("B")
                for off in range(0, len(mv), CHUNK):
                    piece = mv[off : off + CHUNK]
                    h.update(piece)
                    storage_write(fd, piece, path, pace)
                    size += len(piece)
            storage_fsync(fd, path)
        finally:
            storage_close(fd, path)
        rec = FileRecord(size, h.hexdigest(), h.mac())
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
            raise storage_error(path, "open", exc) from exc
        pipe = HashPipe(self.key)
        try:
            head = mmap.mmap(-1, len(header))  # page-aligned copy for O_DIRECT
            head.write(header)
            pipe.feed(header)
            try:
                storage_write(fd, memoryview(head), path)
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
                storage_write(fd, piece, path, pace)
            if body < len(data):  # the unaligned tail goes through the page cache
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
                pipe.feed(data[body:])
                storage_write(fd, data[body:], path)
            storage_fsync(fd, path)
        finally:
            hashes = pipe.finish()
            if fd >= 0:
                storage_close(fd, path)
        rec = FileRecord(len(header) + len(data), hashes.hexdigest(), hashes.mac())
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
            "files": {n: r.as_json() for n, r in sorted(self.files.items())},
            "metrics": metrics or {},
        }
        manifest.update(extra or {})
        if self.key is not None:
            unkeyed = sorted(n for n, r in self.files.items() if r.mac is None)
            if unkeyed:  # a rank without the key: nothing would vouch for its files
                raise CkptdError(f"{', '.join(unkeyed)} of step {self.step} was written without the key; every rank "
                                 "needs the same key file (CKPTD_KEY_FILE / key_file)")
            sign_manifest(manifest, self.key)
        manifest["digest"] = manifest_digest(manifest)
        data = encode_manifest(manifest)
        self.write_file(MANIFEST, [data])
        self.files.pop(MANIFEST)
        final = os.path.join(self.root, self.name)
        try:
            fsync_dir(self.tmp)
        except OSError as exc:
            raise storage_error(self.tmp, "fsync", exc) from exc
        if os.path.lexists(final):
            if replace and not os.path.islink(final):
                return self._exchange(final)
            # Never overwrite a checkpoint: a valid one of this step already exists.
            raise CkptdError(f"checkpoint {final} already exists; not overwriting it")
        try:
            os.rename(self.tmp, final)
        except OSError as exc:
            raise storage_error(final, "rename", exc) from exc
        try:
            fsync_dir(self.root)
            fsync_parent_once(self.root)
        except OSError as exc:
            # The rename may not be durable: take the checkpoint back out of sight rather than
            # publish something whose durability a failed fsync left unknown.
            self.tmp = os.path.join(self.root, trash_name(self.name))
            try:
                os.rename(final, self.tmp)
            except OSError:
                self.tmp = final
            raise storage_error(self.root, "fsync", exc) from exc
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
            raise storage_error(final, "rename", exc) from exc
        try:
            fsync_dir(self.root)
        except OSError as exc:
            try:  # durability unknown: put the old checkpoint back under its name
                rename_exchange(self.tmp, final)
            except OSError:
                pass
            raise storage_error(self.root, "fsync", exc) from exc
        self.committed_path = final
        remove_tree(self.root, os.path.basename(self.tmp))
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
