"""What is in a checkpoint root and what of it is valid: listing, the manifest-level check, full verification.

LevelDB's version set, for ckptd: which checkpoints exist (:func:`list_checkpoints`, by manifest step), what
each one is (:class:`CheckpointInfo`), and whether it can be trusted (:func:`inspect_checkpoint` without
checksums, :func:`verify` with them, :func:`latest_valid`). Listing never raises on a checkpoint's content:
whatever is wrong is its ``reason``. Reads here are bounded and never follow a link or wait on a FIFO.
The supervisor and the commands use this module; the restore read engine is ``reader``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError, NotFoundError
from .auth import Key
from .format import (
    FORMAT,
    MAX_DCP_JSON_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    MAX_STATE_BYTES,
    MAX_STATE_DEPTH,
    MAX_STATE_VALUES,
    Hashes,
    authentication_problem,
    dcp_problem,
    json_bounds_problem,
    load_json,
    manifest_digest,
    manifest_problem,
    read_safetensors_header,
    record_problem,
)
from .layout import CHUNK, DCP_JSON, MANIFEST, NAME_RE, STATE, TENSORS

# Errors of the reading process, not of what it reads: out of descriptors or memory never makes a
# checkpoint "invalid" (the listing fails instead, and the supervisor keeps what it knew).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


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
    # The key its files are checked with: set when it was listed with a key and its manifest authenticated
    # (None without a key, or for an unkeyed checkpoint a key's allow_unkeyed accepted).
    mac_key: Key | None = field(default=None, repr=False, compare=False)

    @property
    def keyed(self) -> bool:
        """Written with a key (its manifest carries a MAC), whether or not it was authenticated here."""
        return "auth" in self.manifest

    @property
    def epoch(self) -> int | None:
        return self.manifest.get("epoch")

    @property
    def origin(self) -> dict[str, Any] | None:
        """What started the run that wrote it (origin.py); None in checkpoints of older versions."""
        return self.manifest.get("origin")

    @property
    def stage(self) -> str | None:
        """The stage of the run that wrote it (``Checkpointer(stage=...)``), or None."""
        return self.manifest.get("stage")

    @property
    def lineage(self) -> dict[str, Any] | None:
        """Where the run that wrote it branched from (lineage.py), or None for a run started from nothing."""
        return self.manifest.get("lineage")

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
            "stage": self.stage,
            "lineage": self.lineage,
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


def read_manifest(path: str, key: Key | None = None) -> dict[str, Any]:
    """Parse and check a checkpoint's manifest, authenticated with ``key`` when given (raises
    CorruptCheckpointError naming the problem)."""
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
    return parse_manifest(raw, path, key)


def parse_manifest(raw: bytes, path: str, key: Key | None = None) -> dict[str, Any]:
    """Check a manifest's bytes (JSON bounds, format, digest, fields; with ``key``, its MAC) wherever they were
    read from: a checkpoint's directory or the object-store tier. ``path`` names it in the error."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(path, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    m = load_json(raw, path, MANIFEST, MAX_MANIFEST_DEPTH, MAX_MANIFEST_BYTES)
    if not isinstance(m, dict):
        raise CorruptCheckpointError(path, f"{MANIFEST} is not a JSON object")
    if m.get("format") != FORMAT:
        raise CorruptCheckpointError(path, f"{MANIFEST} has format {m.get('format')!r}; this ckptd reads {FORMAT}")
    try:
        digest_ok = m.get("digest") == manifest_digest(m)
    except (TypeError, ValueError):
        digest_ok = False
    if not digest_ok:
        raise CorruptCheckpointError(path, f"{MANIFEST} digest mismatch (the manifest was altered or garbled)")
    problem = manifest_problem(m)
    if problem:
        raise CorruptCheckpointError(path, f"{MANIFEST} {problem}")
    if key is not None:
        problem = authentication_problem(m, key)
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
        entry = present.get(fname)
        if entry is None:
            raise CorruptCheckpointError(path, f"{fname} is missing")
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(path, f"{fname} is not a regular file")
        if st.st_size != rec["bytes"]:
            raise CorruptCheckpointError(path, f"{fname} is {st.st_size} bytes, manifest says {rec['bytes']} "
                                               "(truncated or altered)")


def inspect_checkpoint(path: str, key: Key | None = None) -> CheckpointInfo:
    """Manifest-level check of one checkpoint directory (no checksums; with ``key``, the manifest's MAC). Never
    raises on its content: whatever is wrong with it is reported as ``valid=False`` with the ``reason``."""
    name = os.path.basename(os.path.normpath(path))
    m_step = NAME_RE.match(name)
    info = CheckpointInfo(name=name, path=path, step=int(m_step.group(1)) if m_step else -1)
    try:
        if os.path.islink(path):
            raise CorruptCheckpointError(path, "the checkpoint directory is a symlink")
        m = read_manifest(path, key)
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
    info.mac_key = key if key is not None and "auth" in m else None
    info.step = m["step"]
    info.kind = m["kind"]
    info.created = float(m["created"])
    info.bytes = sum(r["bytes"] for r in m["files"].values())
    info.metrics = dict(m.get("metrics") or {})
    if m_step and int(m_step.group(1)) != info.step:
        info.valid, info.reason = False, f"directory name says step {int(m_step.group(1))}, manifest says {info.step}"
    return info


def list_checkpoints(root: str, key: Key | None = None) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``root``, oldest first (ordered by step, then time); with ``key``, one
    whose manifest does not authenticate is listed invalid."""
    if not os.path.isdir(root):
        raise NotFoundError(f"checkpoint directory {root} does not exist; pass the --dir you trained with")
    out = [inspect_checkpoint(e.path, key) for e in os.scandir(root) if NAME_RE.match(e.name)]
    out.sort(key=lambda i: (i.step, i.created, i.name))
    return out


MAX_RUNS = 4096  # run directories one listing of a root looks into


def list_runs(root: str) -> list[tuple[str, list[CheckpointInfo]]]:
    """The run directories of ``root``: ``root`` itself when it holds checkpoints, and each of its
    subdirectories that does (one level; hidden entries and links are skipped, at most MAX_RUNS looked into),
    as ``(path, checkpoints oldest first)``, sorted by path."""
    if not os.path.isdir(root):
        raise NotFoundError(f"{root} does not exist or is not a directory; give the directory that holds the runs")
    out = []
    own = list_checkpoints(root)
    if own:
        out.append((root, own))
    subdirs = sorted(e.path for e in os.scandir(root)
                     if not e.name.startswith(".") and not NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False))
    for path in subdirs[:MAX_RUNS]:
        try:
            infos = list_checkpoints(path)
        except (NotFoundError, PermissionError):
            continue  # removed meanwhile, or not ours to read
        if infos:
            out.append((path, infos))
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


def read_dcp_json(path: str) -> Any:
    """A sharded checkpoint's ``dcp.json``, parsed within bounds (OSError when it cannot be read)."""
    raw = read_small(os.path.join(path, DCP_JSON), MAX_DCP_JSON_BYTES)
    return load_json(raw, path, DCP_JSON, 8, MAX_DCP_JSON_BYTES)


def hash_file(path: str, progress: Any = None) -> tuple[int, str]:
    """(size, xxh3-128) of a file."""
    size, h = hash_file_with(path, None, progress)
    return size, h.hexdigest()


def hash_file_with(path: str, key: Key | None, progress: Any = None) -> tuple[int, Hashes]:
    """(size, hashes) of a file read once: its xxh3 and, with ``key``, its keyed BLAKE3 from the same bytes."""
    h = Hashes(key)
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
    return size, h


def verify(path: str, progress: Any = None, key: Key | None = None) -> CheckpointInfo:
    """Full verification: manifest, structure, every file's checksum, and the metadata parsed
    and checked as ``restore()`` does (tensor header, bounds of ``state.json``). With ``key``, the manifest's
    MAC and every file's keyed BLAKE3 too, from the same read as the checksum."""
    info = inspect_checkpoint(path, key)
    if not info.valid:
        return info
    for fname, rec in sorted(info.manifest["files"].items()):
        fpath = os.path.join(path, fname)
        try:
            size, hashes = hash_file_with(fpath, info.mac_key, progress)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise
            info.valid, info.reason = False, f"{fname} unreadable: {exc.strerror}"
            return info
        problem = record_problem(fname, rec, size, hashes)
        if problem:
            info.valid, info.reason = False, problem
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


def latest_valid(root: str, key: Key | None = None) -> CheckpointInfo | None:
    """The newest checkpoint that verifies fully (checksums included; with ``key``, authenticated), or None."""
    for info in reversed(list_checkpoints(root, key)):
        if info.valid:
            checked = verify(info.path, key=key)
            if checked.valid:
                return checked
    return None


def iter_checkpoint_paths(target: str) -> Iterator[str]:
    """A checkpoint directory itself, or every checkpoint under a root."""
    if os.path.isfile(os.path.join(target, MANIFEST)) or NAME_RE.match(os.path.basename(os.path.normpath(target))):
        yield target
        return
    for info in list_checkpoints(target):
        yield info.path
