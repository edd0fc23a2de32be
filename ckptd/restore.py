"""Reading a checkpoint back: the candidate loop, the reader with its undo log, and ``load_state``.

:func:`newest` is the restore loop of every Checkpointer, whatever the ranks (ranks.py): the leader lists
the candidates, newest first; each rank stages its part of one (``stage``: read, verify, not applied);
the ranks agree on the verdict; all apply it, or all put their tensors back and the leader quarantines it.
:func:`read_tensors` reads a tensor file into the run's own tensors where it can, keeping an undo log
(:class:`_Backup`) so that a candidate that fails leaves them as they were. :func:`load_state` reads a
whole checkpoint into fresh objects, for tools and evaluation scripts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import store
from .errors import CkptdError, CorruptCheckpointError, NotFoundError
from .ranks import Solo, rank_files
from .snapshot import copy_pairs
from .state import TORCH_DTYPES, StateDecodeError, check_rng, decode

log = logging.getLogger("ckptd")

GONE = "disappeared while being read"  # a candidate another process moved away meanwhile: not corrupt


def newest(ranks: Solo, directory: str, stage: Callable[[store.CheckpointInfo], Prepared], *, quiet: bool = False,
           key: store.Key | None = None) -> tuple[store.CheckpointInfo, Restored] | None:
    """Apply the newest checkpoint of ``directory`` that every rank staged; None when there is none (said on
    one line unless ``quiet``: another checkpoint is tried next).

    Invalid candidates are quarantined by the leader (the reason, per rank when there are several) and
    the next older one is tried; with ``key``, so is one that does not authenticate (its manifest at listing,
    every byte when staged). A candidate that verified but does not fit (a CkptdError from ``stage``)
    stops every rank: this rank's own error is raised as it was, a peer's as a CkptdError.
    """
    listed: dict[str, store.CheckpointInfo] = {}

    def candidates() -> list[str]:
        if not os.path.isdir(directory):
            return []
        if ranks.leader:
            store.remove_stale_temps(directory)
        listed.update((info.name, info) for info in reversed(store.list_checkpoints(directory, key)))
        return list(listed)

    names = ranks.agree(candidates)
    for name in names:
        info = listed.get(name) or store.inspect_checkpoint(os.path.join(directory, name), key)
        prepared: Prepared | None = None
        why, fatal = "", None
        try:
            if not info.valid:
                raise CorruptCheckpointError(info.path, info.reason)
            prepared = stage(info)
        except CorruptCheckpointError as exc:
            why = exc.reason
        except FileNotFoundError:
            why = GONE
        except CkptdError as exc:  # verified, but does not fit this run: every rank stops
            fatal = exc
        except BaseException:
            if prepared is not None:
                prepared.discard()  # read in place: whatever failed, this rank's tensors go back as they were
            raise
        verdicts = ranks.verdicts((why, str(fatal) if fatal is not None else ""))
        bad = [(r, w) for r, (w, _) in enumerate(verdicts) if w]
        fatals = [f for _, f in verdicts if f]
        if not bad and not fatals:
            assert prepared is not None
            return info, prepared.apply()
        if prepared is not None:
            prepared.discard()  # refused by a peer: this rank's tensors go back as they were
        if fatal is not None:
            raise fatal
        if fatals:
            raise CkptdError(fatals[0])
        _set_aside(ranks, directory, info, bad)
    if not quiet:
        announce(f"ckptd: no {'valid ' if names else ''}checkpoint in {directory}: starting at step 0")
    return None


def _set_aside(ranks: Solo, directory: str, info: store.CheckpointInfo, bad: list[tuple[int, str]]) -> None:
    """A candidate some rank refused: the leader quarantines it (one that disappeared was moved by another
    process: nothing to do); a rank that does not write, alone, says it skipped it."""
    gone = all(w == GONE for _, w in bad)
    reason = "; ".join(ranks.who(r, w) for r, w in bad)
    if gone and (ranks.leader or ranks.world == 1):
        log.info("ckptd: checkpoint %s disappeared while being read (moved by another process)", info.path)
    elif ranks.leader:
        store.quarantine(directory, info.name, reason)
    elif ranks.world == 1:
        log.warning("ckptd: checkpoint %s is invalid (%s); skipped (rank %d leaves it to rank 0)",
                    info.name, reason, ranks.rank)


def announce(line: str) -> None:
    """The one line restore() always says: an INFO record when logging is configured for the ``ckptd``
    logger (it or an ancestor has a handler), else printed to stderr, so a plain script shows it too
    (logging's last-resort handler would only show warnings)."""
    if log.hasHandlers():
        log.info("%s", line)
    else:
        # One write with its newline: the ranks of a job share one stderr, and print() writes the text and the
        # newline apart, so two ranks' lines ran together.
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def check_state(state: Any, info: store.CheckpointInfo) -> None:
    """Types of every part of a decoded state that restore applies (StateDecodeError naming it)."""
    if not isinstance(state, dict):
        raise StateDecodeError("the state is not an object")
    progress = state.get("progress")
    if not isinstance(progress, dict) or progress.get("step") != info.step or isinstance(progress.get("step"), bool):
        raise StateDecodeError(f"progress/step is not the manifest's step {info.step}")
    epoch = progress.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        raise StateDecodeError(f"progress/epoch {epoch!r} is not an integer")
    for name in ("extra", "user", "metrics", "model"):
        if not isinstance(state.get(name, {}), dict):
            raise StateDecodeError(f"{name} is not an object")
    if not all(isinstance(e, dict) for e in state.get("extra", {}).values()):
        raise StateDecodeError("extra holds an entry that is not an object")
    check_rng(state.get("rng") or {})


@dataclass
class Staged:
    """A verified tensor file, read but not yet applied.

    ``source``: every tensor's verified data (live CPU tensors read in place, staging views, or fresh
    tensors where no live tensor of that key, dtype and shape exists). ``result``: what the state
    holds after :meth:`apply` (the live tensors, or the same fresh tensors). ``undo``: (address in a
    live tensor, address of the backup of its bytes from before the read, length) for the tensors read
    in place; :meth:`rollback` puts them back, in reverse file order (right for tensors that share
    memory too). The addresses stay valid: ``result`` holds the live tensors, ``buffer`` the backups.
    """

    source: dict[str, torch.Tensor]
    result: dict[str, torch.Tensor]
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (live target, staging view): copied in on apply
    undo: list[tuple[int, int, int]] = field(default_factory=list)  # (live address, backup address, bytes)
    buffer: torch.Tensor | None = None  # the staging buffer the backups and staged copies live in

    def apply(self, pool: ThreadPoolExecutor | None = None) -> None:
        """Copy the staged data into the live tensors (libc memmove over up to COPY_THREADS threads)."""
        copy_pairs(self.copies, pool)
        self.copies, self.undo = [], []

    def rollback(self) -> None:
        """Leave the live tensors as they were before the read (a candidate that failed or was refused)."""
        for live, backup, n in reversed(self.undo):
            ctypes.memmove(live, backup, n)
        self.copies, self.undo = [], []


@dataclass
class Restored:
    """What applying a checkpoint restored: its step, and the state's tensors (the live ones, or fresh)."""

    step: int
    tensors: dict[str, torch.Tensor]


class Prepared:
    """A checkpoint read and verified on this rank, not applied yet: :meth:`apply` it, or :meth:`discard` it
    (the run's tensors go back as they were). ``tree``: its state.json, parsed."""

    def __init__(self, apply: Callable[[], Restored], discard: Callable[[], None], tree: dict[str, Any]) -> None:
        self.apply, self.discard, self.tree = apply, discard, tree


class _Backup:
    """Copies, in file order and ahead of the reader, the bytes of each live tensor about to be read in
    place into its backup (the reused snapshot buffer). ``ready(end)`` blocks a read request until
    everything before file offset ``end`` is backed up; :meth:`finish` stops and returns the undo log
    of what was backed up.

    The copy keeps at most ``LEAD`` bytes ahead of the reader's requests: the same memory copy in one
    burst at the start (on two cores, beside the reader and the hashing) slowed the read more than
    spread out in step with it (docs/performance.md, "Restore: read in place with an undo log").
    """

    LEAD = 2 * store.READ_CHUNK

    def __init__(self, plan: UndoPlan) -> None:
        self._plan = plan  # (file end offset, live address, backup address, bytes) per piece, in file order
        self._done = 0  # entries of the plan backed up
        self._covered = 0  # file offset up to which reads may go
        self._wanted = 0  # file offset the reader's newest request ends at
        self._stop = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ckptd-restore-backup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, (end, live, backup, n) in enumerate(self._plan):
                with self._cond:
                    while not self._stop and self._covered >= self._wanted + self.LEAD:
                        self._cond.wait()
                    if self._stop:
                        return
                if n:
                    ctypes.memmove(backup, live, n)
                with self._cond:
                    self._done, self._covered = i + 1, end
                    self._cond.notify_all()
        except BaseException as exc:  # pragma: no cover - memmove does not fail
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def ready(self, end: int) -> None:
        with self._cond:
            self._wanted = max(self._wanted, end)
            self._cond.notify_all()
            while self._covered < end and self._error is None and self._done < len(self._plan):
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def finish(self) -> list[tuple[int, int, int]]:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        return [(live, backup, n) for _, live, backup, n in self._plan[: self._done] if n]


STAGING_ALIGN = 64  # every staged tensor starts cache-line aligned (and so aligned for its dtype)


def read_tensors(info: store.CheckpointInfo, live: Mapping[str, torch.Tensor],
                  check: Callable[[str, list[store.TensorEntry]], None] | None = None,
                  staging: Callable[[int, bool], torch.Tensor] | None = None, fname: str = store.TENSORS,
                  during: Callable[[], None] | None = None, source: tuple[int, int, int] | None = None) -> Staged:
    """Read and verify a checkpoint's tensor file; ``live`` ends as it was unless it verified.

    Order: the header is read and checked structurally (store.parse_safetensors_header: known
    dtypes, shapes matching byte spans that tile the file, so nothing allocated can exceed the
    file); ``check(path, entries)`` may refuse it (a different model), which counts only once the
    whole file's checksum matched (else the checkpoint is corrupt, whatever its header says). Then
    every byte is read (store.read_into, checksummed in file order): data for a live tensor of the
    same key, dtype and shape into ``staging(nbytes, pinned)``, everything else into fresh tensors.
    ``during()`` runs while the data is being read (store.read_into); what it raises, like a
    mismatch, puts ``live`` back as it was.
    Raises CorruptCheckpointError unless the whole file matches the manifest's size and checksum.
    ``source``: the same file's bytes elsewhere, (descriptor, offset, size): the memory tier's slot of this
    step (memtier.Region.source), read and verified against this manifest exactly like the file.
    """
    path = os.path.join(info.path, fname)
    if fname not in info.manifest["files"]:
        raise CorruptCheckpointError(info.path, f"{fname} is not listed in the manifest")
    rec = info.manifest["files"][fname]
    fd = source[0] if source is not None else os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    base = source[1] if source is not None else 0  # where the file's bytes start in ``fd``
    staged: Staged | None = None
    prefetch: store.Prefetch | None = None
    try:
        size = source[2] if source is not None else os.fstat(fd).st_size
        if size != rec["bytes"]:
            raise CorruptCheckpointError(info.path, f"{fname} is {size} bytes, manifest says {rec['bytes']}")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            f.seek(base)
            lead, body = store.read_header_bytes(f, path, size)
        h = store.Hashes(info.mac_key)  # with a key: its MAC from the same bytes
        h.update(lead)
        h.update(body)
        data_start = base + 8 + len(body)
        prefetch = store.Prefetch(fd, data_start, size) if store.RESTORE_PREFETCH and source is None else None
        try:
            _, entries = store.parse_safetensors_header(body, info.path, size - (data_start - base))
            if check is not None:
                check(info.path, entries)
        except CkptdError:
            # Believe nothing the header says until the bytes verified: a damaged header is corruption.
            _hash_rest(fd, data_start, base + size, h, path)
            problem = store.record_problem(fname, rec, size, h)
            if problem:
                raise CorruptCheckpointError(info.path, problem) from None
            raise
        staged, views, undo = _plan(entries, live, staging)
        backup = None
        if any(n for _, _, _, n in undo):
            backup = _Backup([(data_start + end, a, b, n) for end, a, b, n in undo])
        if prefetch is not None:
            prefetch.stop()
        try:
            end = store.read_into(fd, data_start, views, h, path, ready=backup.ready if backup else None,
                                  during=during)
        finally:
            if backup is not None:
                staged.undo = backup.finish()
        problem = store.record_problem(fname, rec, end - base, h)
        if problem:
            raise CorruptCheckpointError(info.path, problem)
    except BaseException:
        if staged is not None:
            staged.rollback()  # a failed candidate leaves the run's tensors as they were
        raise
    finally:
        if prefetch is not None:
            prefetch.stop()
            prefetch.join()
        if source is None:
            os.close(fd)
    return staged


UndoPlan = list[tuple[int, int, int, int]]


def _bytes_at(address: int, n: int) -> memoryview:
    """A writable byte view of ``n`` bytes of memory at ``address`` (a tensor's, kept alive by the caller):
    a quarter of the cost of going through ``Tensor.numpy()``, which counts for thousands of tensors."""
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


def _plan(entries: list[store.TensorEntry], live: Mapping[str, torch.Tensor],
          staging: Callable[[int, bool], torch.Tensor] | None) -> tuple[Staged, list[memoryview], UndoPlan]:
    """Where each tensor's bytes go (views, in file order), and the undo plan for :class:`_Backup`.

    A live CPU tensor of the same key, dtype and shape is read in place, its old bytes first copied
    to a slice of the staging buffer (the undo log); another live tensor (CUDA, non-contiguous) is
    read into a staging slice and copied in on apply; anything else into a fresh tensor. The undo
    plan lists, in file order, (end offset in the data section, live address, backup address, bytes)
    in pieces of at most store.READ_CHUNK (so the copy keeps pace with the reader even for one huge
    tensor), and (end, 0, 0, 0) for a tensor that needs no backup. Addresses, not tensor slices: the
    plan of a state with thousands of tensors is made before the first byte is read.
    """
    layout: list[tuple[store.TensorEntry, torch.dtype, torch.Tensor | None, int]] = []
    off = 0
    for e in entries:
        dtype = TORCH_DTYPES[e.dtype]
        target = live.get(e.key) if staging is not None else None
        if target is not None and (target.dtype != dtype or tuple(target.shape) != e.shape):
            target = None  # e.g. optimizer state of another shape: load_state_dict replaces it
        layout.append((e, dtype, target, off if target is not None else -1))
        if target is not None:
            off += -(-(e.end - e.start) // STAGING_ALIGN) * STAGING_ALIGN
    pinned = any(t is not None and t.is_cuda for _, _, t, _ in layout)
    buf = staging(max(off, 1), pinned) if off and staging is not None else None
    base = buf.data_ptr() if buf is not None else 0
    staged = Staged({}, {}, [], buffer=buf)
    views: list[memoryview] = []
    undo: UndoPlan = []
    step = store.READ_CHUNK
    for e, dtype, target, at in layout:
        n = e.end - e.start
        if target is None:
            src = torch.empty(e.shape, dtype=dtype)  # bounded: the header's spans tile the file
            staged.result[e.key] = src
            undo.append((e.end, 0, 0, 0))
            dest = src.data_ptr()
        else:
            assert buf is not None
            staged.result[e.key] = target
            if target.is_cpu and target.is_contiguous():
                src = target  # in place; the slot keeps the old bytes until apply
                dest = target.data_ptr()
                undo.extend((e.start + min(i + step, n), dest + i, base + at + i, min(step, n - i))
                            for i in range(0, n, step))
            else:
                src = buf[at : at + n].view(dtype).view(e.shape)
                staged.copies.append((target, src))
                undo.append((e.end, 0, 0, 0))
                dest = base + at
        staged.source[e.key] = src
        if n:
            views.append(_bytes_at(dest, n))
    return staged, views, undo


def _hash_rest(fd: int, offset: int, size: int, h: Any, path: str) -> None:
    """Feed the file's bytes from ``offset`` to ``h`` through a small buffer (nothing kept)."""
    buf = memoryview(bytearray(store.CHUNK))
    while offset < size:
        n = os.preadv(fd, [buf[: min(len(buf), size - offset)]], offset)
        if n == 0:
            raise CorruptCheckpointError(os.path.dirname(path), f"{store.TENSORS} ends early (truncated)")
        h.update(buf[:n])
        offset += n


def read_state_json(info: store.CheckpointInfo, raw: bytes | None = None) -> Any:
    """state.json parsed (checksum verified first); ``raw``: its bytes from elsewhere (the memory tier)."""
    files = info.manifest["files"]
    for fname in (store.TENSORS, store.STATE):
        if fname not in files:
            raise CorruptCheckpointError(info.path, f"{fname} is not listed in the manifest")
    if raw is None:
        raw = store.read_small(os.path.join(info.path, store.STATE), store.MAX_STATE_BYTES)
    _check_small(info, store.STATE, raw)
    tree = store.load_json(raw, info.path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(info.path, f"{store.STATE} is not a JSON object")
    return tree


def _check_small(info: store.CheckpointInfo, fname: str, raw: bytes) -> None:
    """A small file read whole: its checksum (and with the checkpoint's key, its MAC) against the manifest."""
    h = store.Hashes(info.mac_key)
    h.update(raw)
    problem = store.record_problem(fname, info.manifest["files"][fname], len(raw), h)
    if problem:
        raise CorruptCheckpointError(info.path, problem)


def read_rank_part(info: store.CheckpointInfo, rank: int) -> dict[str, Any] | None:
    """This rank's own state in a checkpoint written by several ranks (decoded, checksums verified);
    None for a single-process checkpoint. A rank the checkpoint has no part for (the job grew) keeps
    its fresh RNG streams and objects, with a warning."""
    world = info.manifest.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool):
        return None
    tname, jname = rank_files(rank)
    files = info.manifest["files"]
    if tname not in files or jname not in files:
        log.warning("ckptd: %s was written by %d ranks and holds no state of rank %d: its RNG streams and "
                    "extra objects start fresh", info.name, world, rank)
        return None
    raw = store.read_small(os.path.join(info.path, jname), store.MAX_STATE_BYTES)
    _check_small(info, jname, raw)
    tree = store.load_json(raw, info.path, jname, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(info.path, f"{jname} is not a JSON object")
    staged = read_tensors(info, {}, fname=tname)
    try:
        return decode(tree, staged.result.__getitem__)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{jname}: {exc}") from None


def _state_without_tensors(info: store.CheckpointInfo, tree: dict[str, Any]) -> dict[str, Any]:
    """The state with every tensor a meta tensor (dtype, shape), from the tensor file's header only."""
    tpath = os.path.join(info.path, store.TENSORS)
    fd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            _, body = store.read_header_bytes(f, tpath, size)
    finally:
        os.close(fd)
    _, entries = store.parse_safetensors_header(body, info.path, size - 8 - len(body))
    metas = {e.key: torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device="meta") for e in entries}

    def lookup(key: str) -> torch.Tensor:
        if key not in metas:
            raise StateDecodeError(f"tensor {key} is not in {store.TENSORS}")
        return metas[key]

    try:
        return decode(_numpy_as_tensors(tree), lookup)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None


def _numpy_as_tensors(tree: Any) -> Any:
    """The state tree with NumPy arrays and scalars tagged as tensors (a meta tensor has no NumPy form)."""
    if isinstance(tree, list):
        return [_numpy_as_tensors(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, val), = tree.items()
        if tag == "__np":
            return {"__t": val}
        if tag == "__npscalar" and isinstance(val, list) and len(val) == 2:
            return {"__t": val[1]}
    return {k: _numpy_as_tensors(v) for k, v in tree.items()}


def resolve(path: str | os.PathLike[str], key: store.Key | None = None) -> str:
    """A checkpoint path as the CLI names one: a checkpoint directory, ``DIR/latest`` (the newest checkpoint
    of DIR that verifies, checksums included) or ``DIR/N`` (the checkpoint of step N in DIR)."""
    path = os.fspath(path)
    parent, leaf = os.path.split(os.path.normpath(path))
    if os.path.isdir(path) and (os.path.lexists(os.path.join(path, store.MANIFEST)) or store.NAME_RE.match(leaf)):
        return path
    if leaf == "latest" and os.path.isdir(parent or "."):
        info = store.latest_valid(parent or ".", key)
        if info is None:
            raise NotFoundError(f"no valid checkpoint in {parent or '.'}; `ckptd verify {parent or '.'}` says why "
                                "each one is invalid")
        return info.path
    if leaf.isascii() and leaf.isdigit() and os.path.isdir(parent or "."):
        named = os.path.join(parent or ".", store.checkpoint_name(int(leaf)))
        if not os.path.isdir(named):
            raise NotFoundError(f"no checkpoint of step {int(leaf)} in {parent or '.'}; `ckptd ls {parent or '.'}` "
                                "lists them")
        return named
    if not os.path.lexists(path):
        raise NotFoundError(f"{path} does not exist; name a checkpoint (DIR/step-N), DIR/latest or DIR/N")
    return path


def load_state(path: str | os.PathLike[str], *, tensors: bool = True,
               key_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load a checkpoint's whole state as a dict of plain objects and tensors (verifies checksums).

    For evaluation scripts and tools: ``ckptd.load_state(p)["model"]`` is a state_dict. ``path`` is a
    checkpoint, ``DIR/latest`` or ``DIR/N`` (as the CLI takes them). ``tensors=False``: only the
    manifest, ``state.json`` (checksummed) and the tensor file's header are read; every tensor is a
    'meta'`` tensor of its dtype and shape (NumPy arrays and scalars too): no tensor data is read nor
    checksummed - cheap, e.g. to rebuild a model from arguments saved in ``extra`` or ``ck.user``.
    ``key_file`` (default ``$CKPTD_KEY_FILE``): the checkpoint must authenticate with that key (its manifest,
    and every byte read); without a key an authenticated checkpoint is checked by its checksums only.
    """
    key = store.Key.load(os.fspath(key_file)) if key_file is not None else store.key_from_env()
    info = store.inspect_checkpoint(resolve(path, key), key)
    if not info.valid:
        raise CorruptCheckpointError(info.path, info.reason)
    tree = read_state_json(info)
    if not tensors:
        return _state_without_tensors(info, tree)
    staged = read_tensors(info, {})  # fresh tensors, checksums verified
    try:
        state = decode(tree, staged.result.__getitem__)
    except StateDecodeError as exc:
        raise CorruptCheckpointError(info.path, f"{store.STATE}: {exc}") from None
    own = read_rank_part(info, 0)  # written by several ranks: rank 0's own state
    if own is not None:
        state.update(own)
    return state
