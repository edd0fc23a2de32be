"""The background half of a save, for every way ranks cooperate (ranks.py): one temporary directory, one commit.

:func:`encode` turns a state tree into its two files (tensors snapshotted into a reused buffer, JSON);
:func:`write` writes every rank's files into the leader's temporary directory and has the leader commit
the one manifest once all are durable. With one process the collective steps are local, and an error
reaches the caller as it was raised (a StorageError with its errno); with several ranks the same
collectives run in the same order on every rank whatever fails where, and every rank raises a
CkptdError naming the rank that failed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from . import store
from .errors import CkptdError
from .ranks import Sharded, Solo
from .snapshot import Snapshot
from .state import Encoder
from .state import dumps as state_dumps

PER_RANK_KEYS = ("rng", "extra", "user")  # state that differs between ranks; the rest is replicated
DCP = ":dcp"  # the sharded tensors' entry among a rank's files (written by torch.distributed.checkpoint)


@dataclass
class File:
    """One file of a save: ``head`` is the whole content (``data`` None), a safetensors header followed by
    ``data``, or (``name`` DCP) the staged sharded tensors."""

    name: str
    head: Any
    data: memoryview | None = None

    @property
    def size(self) -> int:
        if self.name == DCP:  # this rank's shards (a DTensor's numel() is the whole tensor's)
            local = (t.to_local() if hasattr(t, "to_local") else t for t in self.head.values())
            return sum(t.numel() * t.element_size() for t in local)
        return len(self.head) + (len(self.data) if self.data is not None else 0)


def encode(tree: Any, snapshot: Snapshot, names: tuple[str, str]) -> tuple[list[File], Mapping[str, torch.Tensor]]:
    """A state tree as (tensor file, JSON file), its tensors copied into ``snapshot`` (the save's stall);
    and the tensors by key. Refuses what restore would refuse (store's bounds on the JSON)."""
    encoder = Encoder()
    encoded = encoder.encode(tree, "")
    header, data = snapshot.take(encoder.tensors)
    return [File(names[0], header, data), File(names[1], state_dumps(encoded))], encoder.tensors


def _fail(ranks: Solo, message: str, own: BaseException | None) -> NoReturn:
    """Raise what failed: one process, the error as it happened (a StorageError with its errno); several
    ranks, ``message`` (the same on every rank)."""
    if own is not None and ranks.world == 1:
        raise own
    raise CkptdError(message)


def write(ranks: Solo, directory: str, step: int, files: list[File], fields: dict[str, Any],
          pace: store.Pace | None, replace: bool = False, key: store.Key | None = None) -> str | None:
    """Write this rank's ``files`` into the leader's temporary directory; the leader commits when every rank's
    files are durable. Returns the checkpoint's path; None when a valid checkpoint of ``step`` exists (unless
    ``replace``: the state at close() that work after the step's save changed). Raises when nothing was
    published (the temporary directory is removed). ``key``: each rank MACs its own files with it as it writes
    them, and the leader authenticates the manifest."""
    leader = _Leader(directory, step, replace, key)
    plan = ranks.agree(leader.open)
    if plan[0] == "exists":
        return None
    if plan[0] == "error":
        _fail(ranks, f"checkpoint of step {step} not written: rank 0: {plan[1]}", leader.error)
    try:
        gathered = ranks.gather(_write_files(ranks, directory, step, plan[1], leader.pending, files, pace, key))
        outcome = ranks.agree(lambda: leader.commit(gathered, ranks, fields))
        if outcome[0] == "error":
            _fail(ranks, f"checkpoint of step {step} not published: {outcome[1]}", leader.error)
        return outcome[1]
    finally:
        leader.close()


def _write_files(ranks: Solo, directory: str, step: int, tmp: str, pending: store.PendingCheckpoint | None,
                 files: list[File], pace: store.Pace | None, key: store.Key | None = None
                 ) -> tuple[dict[str, store.FileRecord], str]:
    """This rank's files into the temporary directory: (their records, "" or what failed)."""
    records: dict[str, store.FileRecord] = {}
    try:
        part = pending or store.PendingCheckpoint.join(directory, step, tmp, key)
        for f in files:
            if f.name == DCP:
                assert isinstance(ranks, Sharded)  # only a sharded model's save has this entry
                ranks.save_shards(f.head, part, pace)
            elif f.data is None:
                records[f.name] = part.write_file(f.name, (f.head,))
            else:
                records[f.name] = part.write_aligned(f.name, f.head, f.data, pace)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gather after this, whatever failed
        if ranks.world == 1:
            raise  # one process: nothing to meet; the leader's temporary directory goes (write's finally)
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (OSError, CkptdError)) else str(exc)
        return records, error
    return records, ""


class _Leader:
    """The leader's side of a save: the temporary directory it opens, commits or removes."""

    def __init__(self, directory: str, step: int, replace: bool, key: store.Key | None = None) -> None:
        self.directory, self.step, self.replace, self.key = directory, step, replace, key
        self.pending: store.PendingCheckpoint | None = None
        self.error: BaseException | None = None

    def open(self) -> tuple[str, str]:
        """("exists", path) | ("write", temporary directory) | ("error", why)."""
        name = store.checkpoint_name(self.step)
        existing = os.path.join(self.directory, name)
        try:
            if os.path.lexists(existing):
                info = store.inspect_checkpoint(existing, self.key)  # a forged one is no reason to skip
                if info.valid and not self.replace:
                    return "exists", existing
                if not info.valid:
                    store.quarantine(self.directory, name, info.reason)
            self.pending = store.PendingCheckpoint(self.directory, self.step, self.key)
            return "write", self.pending.tmp
        except (OSError, CkptdError) as exc:
            self.error = exc
            return "error", str(exc)

    def commit(self, gathered: list[tuple[dict[str, store.FileRecord], str]], ranks: Solo,
               fields: dict[str, Any]) -> tuple[str, str]:
        """("ok", path) once every rank's files are listed and the manifest is committed, else ("error", why)."""
        pending = self.pending
        assert pending is not None
        errors = [ranks.who(r, e) for r, (_, e) in enumerate(gathered) if e]
        if errors:
            return "error", "; ".join(errors)
        try:
            for recs, _ in gathered[1:]:
                for fname, rec in recs.items():
                    pending.add_file(fname, rec)
            return "ok", pending.commit(**fields, replace=self.replace)
        except (OSError, CkptdError) as exc:
            self.error = exc
            return "error", str(exc)

    def close(self) -> None:
        """Remove the temporary directory unless it was committed (whatever failed, wherever)."""
        if self.pending is not None and self.pending.committed_path is None:
            self.pending.abort()
