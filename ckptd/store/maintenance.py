"""What happens to checkpoints after their commit: amended, pinned, quarantined, deleted, moved aside; and the
temporaries of writers that are gone.

Every change here is a rename or a create relative to a directory descriptor opened without following a link
(``writer``'s helpers), made durable before it is reported; nothing here deletes a checkpoint except
:func:`delete`, which retention and ``ckptd prune`` call for checkpoints they chose.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from ..errors import CkptdError, CorruptCheckpointError
from .auth import Key
from .catalog import CheckpointInfo, inspect_checkpoint, read_small
from .format import MAX_MANIFEST_BYTES, encode_manifest, manifest_digest, manifest_problem, sign_manifest
from .layout import (
    DIR_MODE,
    FILE_MODE,
    MANIFEST,
    NAME_RE,
    PINS_DIR,
    PREVIOUS_DIR,
    QUARANTINE_DIR,
    REMOTE_MARK,
    TMP_PREFIX,
    TMP_RE,
    TRASH_PREFIX,
    check_name,
    temp_name,
    trash_name,
)
from .writer import (
    fsync_dir,
    open_dir,
    remove_tree,
    replacing,
    storage_close,
    storage_error,
    storage_fsync,
    storage_write,
    subdir_at,
    unlink_at,
)

log = logging.getLogger("ckptd")


def amend_manifest(path: str, *, metrics: dict[str, Any] | None = None, finished: bool | None = None,
                   key: Key | None = None) -> CheckpointInfo:
    """Add ``metrics`` to a committed checkpoint's manifest (new keys win) and/or mark it ``finished``.

    The checkpoint's data files are never touched: a new manifest (new digest) is written to a temporary
    file in the root, fsynced, renamed over the old one, and the checkpoint's directory fsynced. A reader
    sees the old manifest or the new one, both valid. Raises CorruptCheckpointError when the checkpoint does
    not pass the manifest-level check, StorageError when a write fails (the old manifest then stays).

    A checkpoint written with a key keeps its authentication: its manifest is authenticated with ``key`` first
    (CorruptCheckpointError when it does not) and the new one gets a new MAC; without the key it is refused
    (CkptdError), since a rewrite would leave it unauthenticated. An unkeyed checkpoint stays unkeyed.
    """
    info = inspect_checkpoint(path, key)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    if info.keyed and key is None:
        raise CkptdError(f"{path} is an authenticated checkpoint: recording metrics in it needs its key "
                         "(key_file / $CKPTD_KEY_FILE); without it the new manifest would not authenticate")
    m = {k: v for k, v in info.manifest.items() if k not in ("digest", "auth")}
    if metrics:
        m["metrics"] = {**(m.get("metrics") or {}), **metrics}
    if finished is not None:
        m["finished"] = finished
    if all(info.manifest.get(k) == v for k, v in m.items()):
        return info  # nothing to record (already finished, the same metrics): no rewrite
    problem = manifest_problem(m)
    if problem:
        raise CkptdError(f"cannot record that in {path}: the manifest {problem}")
    if info.keyed and key is not None:
        sign_manifest(m, key)
    m["digest"] = manifest_digest(m)
    data = encode_manifest(m)
    if len(data) > MAX_MANIFEST_BYTES:
        raise CkptdError(f"cannot record that in {path}: the manifest would exceed {MAX_MANIFEST_BYTES} bytes")
    root = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(root, temp_name(info.name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise storage_error(tmp, "create", exc) from exc
    try:
        try:
            storage_write(fd, memoryview(data), tmp)
            storage_fsync(fd, tmp)
        finally:
            storage_close(fd, tmp)
        try:  # into the checkpoint's directory by a descriptor opened without following a link
            ckpt_fd = open_dir(path)
            try:
                os.rename(tmp, MANIFEST, dst_dir_fd=ckpt_fd)
            finally:
                os.close(ckpt_fd)
        except OSError as exc:
            raise storage_error(os.path.join(path, MANIFEST), "rename", exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        fsync_dir(path)
        fsync_dir(root)
    except OSError as exc:
        raise storage_error(path, "fsync", exc) from exc
    return inspect_checkpoint(path, key)


# ----------------------------------------------------------------------------- temporaries of writers that are gone


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


def remove_stale_temps(root: str) -> list[str]:
    """Remove temp/trash directories left by writers that are gone (crash, SIGKILL)."""
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    host = socket.gethostname()
    for e in os.scandir(root):
        if e.name.startswith(TRASH_PREFIX):
            remove_tree(root, e.name)
            removed.append(e.name)
            continue
        if not e.name.startswith(TMP_PREFIX):
            continue
        m = TMP_RE.match(e.name)
        try:
            if m and m.group(1) == host:
                pid = int(m.group(2))
                if pid != os.getpid() and _pid_alive(pid):
                    continue  # another live writer on this host
            elif time.time() - e.stat(follow_symlinks=False).st_mtime < 3600:
                continue  # another host's writer (shared filesystem) may still be at work
        except FileNotFoundError:
            continue  # its writer finished or another process removed it
        remove_tree(root, e.name)
        removed.append(e.name)
        log.info("ckptd: removed leftover temporary directory %s", e.path)
    return removed


def live_writer(root: str) -> str:
    """Why ``root`` is being written by a process of its own (a live writer's temporary directory), or ""."""
    host = socket.gethostname()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return ""
    for e in entries:
        m = TMP_RE.match(e.name)
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


# ----------------------------------------------------------------------------- moving aside, deleting, pinning


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
        raise storage_error(dest, "move aside", exc) from exc
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
                storage_write(fd, memoryview(data), fname)
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
    trash = trash_name(name)
    try:
        os.rename(src, os.path.join(root, trash))
    except FileNotFoundError:
        return False
    fsync_dir(root)
    remove_tree(root, trash)
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


MAX_REMOTE_MARK = 4096


def mark_remote(root: str, url: str, key: str, step: int, created: float) -> None:
    """Record durably (``root/.remote-committed.json``: temp, fsync, rename, fsync the directory) that the remote
    tier ``url`` holds a committed checkpoint of (``step``, ``created``) under ``key``: local retention that
    waits for the upload (``retention.UploadHold``) then lets go of every local checkpoint not newer than it.
    Written only after the remote manifest's conditional put succeeded."""
    data = json.dumps({"url": url, "key": key, "step": int(step), "created": float(created)}).encode()
    with replacing(os.path.join(root, REMOTE_MARK), FILE_MODE, follow_dir=True) as fd:
        storage_write(fd, memoryview(data), REMOTE_MARK)


def remote_mark(root: str, url: str) -> tuple[int, float] | None:
    """(step, created) of the newest checkpoint recorded as committed on the remote tier ``url`` (None: none is,
    or the record is missing, another tier's, a link, too large or malformed; a caller that holds local copies
    back for the upload then holds them all, the safe side)."""
    try:
        doc = json.loads(read_small(os.path.join(root, REMOTE_MARK), MAX_REMOTE_MARK))
    except (OSError, ValueError, CkptdError):
        return None
    if not isinstance(doc, dict) or doc.get("url") != url:
        return None
    step, created = doc.get("step"), doc.get("created")
    if type(step) is not int or step < 0 or not isinstance(created, (int, float)) or isinstance(created, bool):
        return None
    return step, float(created)


def clear_remote_mark(root: str) -> None:
    """The remote tier holds nothing committed (an empty prefix): no record may say otherwise."""
    try:
        root_fd = open_dir(root, follow=True)
    except FileNotFoundError:
        return
    try:
        try:
            os.unlink(REMOTE_MARK, dir_fd=root_fd)
        except FileNotFoundError:
            return
        os.fsync(root_fd)
    finally:
        os.close(root_fd)
