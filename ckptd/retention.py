"""Retention: which checkpoints to keep. Pure policy plus one ``apply``.

Rules (a checkpoint is kept when any rule keeps it):
  * the newest valid checkpoint, always;
  * the newest ``keep_last`` valid checkpoints;
  * the best ``k`` by each ``keep_best`` metric (min or max);
  * every checkpoint whose step is a multiple of ``keep_every``;
  * pinned ones (``.pins/``, and the one the run resumed from);
  * an emergency checkpoint that no newer valid checkpoint supersedes;
  * with an :class:`UploadHold` (a remote tier that is the durable one), every checkpoint newer than the newest
    one committed remotely: local copies go only once an upload covers them.
Invalid checkpoints are never deleted by retention (restore quarantines them).
Order is by step (then creation time), never by name. With no rule set,
nothing is deleted. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import store
from .errors import CkptdError
from .store import CheckpointInfo


@dataclass(frozen=True)
class Best:
    metric: str
    k: int
    mode: str = "min"

    @classmethod
    def parse(cls, text: str) -> Best:
        """``METRIC:K[:min|max]``, e.g. ``val_loss:3:min``."""
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3) or not parts[0]:
                raise ValueError
            k = int(parts[1])
            mode = parts[2] if len(parts) == 3 else "min"
            if k < 1 or mode not in ("min", "max"):
                raise ValueError
        except ValueError:
            raise CkptdError(
                f"bad keep-best {text!r}: write METRIC:K[:min|max] with K >= 1, e.g. val_loss:3:min") from None
        return cls(parts[0], k, mode)


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_best: tuple[Best, ...] = field(default_factory=tuple)
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise CkptdError(f"{name} must be a whole number >= 1, got {v!r}")

    @property
    def active(self) -> bool:
        return bool(self.keep_last or self.keep_best or self.keep_every)


HELD = "not yet on the remote tier"


@dataclass(frozen=True)
class UploadHold:
    """Local retention waits for the remote tier. ``remote``: (step, created) of the newest checkpoint committed
    remotely (``store.remote_mark``), None when none is. A local checkpoint newer than it is kept whatever the
    rules say; one not newer is covered (the uploader takes only the newest local checkpoint, so one that a newer
    upload superseded is never uploaded itself, and is no longer needed to resume)."""

    remote: tuple[int, float] | None

    def holds(self, info: CheckpointInfo) -> bool:
        return self.remote is None or (info.step, info.created) > self.remote


def held(keep: dict[str, list[str]]) -> list[str]:
    """The names :func:`plan` kept only because they are not yet on the remote tier."""
    return [name for name, why in keep.items() if why == [HELD]]


def plan(infos: Iterable[CheckpointInfo], policy: Policy, pinned: Iterable[str] = (),
         hold: UploadHold | None = None) -> tuple[dict[str, list[str]], list[CheckpointInfo]]:
    """Return ({kept name: [reasons]}, [checkpoints to delete]) without touching disk."""
    valid = sorted((i for i in infos if i.valid), key=lambda i: (i.step, i.created, i.name))
    keep: dict[str, list[str]] = {}

    def mark(info: CheckpointInfo, why: str) -> None:
        keep.setdefault(info.name, []).append(why)

    if not valid:
        return keep, []
    mark(valid[-1], "newest")
    if not policy.active:
        for i in valid:
            mark(i, "no retention policy")
        return keep, []
    if policy.keep_last:
        for i in valid[-policy.keep_last :]:
            mark(i, f"last {policy.keep_last}")
    for best in policy.keep_best:
        for i in ranked(valid, best.metric, best.mode)[: best.k]:
            mark(i, f"best {best.k} {best.metric} ({best.mode})")
    if policy.keep_every:
        for i in valid:
            if i.step % policy.keep_every == 0:
                mark(i, f"every {policy.keep_every} steps")
    pins = set(pinned)
    for idx, i in enumerate(valid):
        if i.name in pins:
            mark(i, "pinned")
        if i.kind == "emergency" and not any(n.step > i.step for n in valid[idx + 1 :]):
            mark(i, "emergency, not superseded")
    if hold is not None:
        for i in valid:
            if i.name not in keep and hold.holds(i):
                mark(i, HELD)
    return keep, [i for i in valid if i.name not in keep]


def ranked(infos: Iterable[CheckpointInfo], metric: str, mode: str = "min") -> list[CheckpointInfo]:
    """The valid checkpoints with a finite ``metric``, best first (``min``: smallest); a tie goes to the newer."""
    scored = [i for i in infos if i.valid and _finite(i.metrics.get(metric))]
    scored.sort(key=lambda i: (float(i.metrics[metric]) * (1 if mode == "min" else -1), -i.step))
    return scored


GROWTH_WARN = 20  # checkpoints in a directory with no retention rule before the one warning


def growth_warning(infos: Iterable[CheckpointInfo], policy: Policy, limit: int = GROWTH_WARN) -> str:
    """The warning for a directory that only grows ("" when a rule bounds it or it holds fewer than ``limit``)."""
    valid = [i for i in infos if i.valid]
    if policy.active or len(valid) < limit:
        return ""
    root = os.path.dirname(valid[-1].path)
    size = sum(i.bytes for i in valid)
    return (f"{root} holds {len(valid)} checkpoints ({size / 2**30:.2f} GiB) and no retention rule deletes any; "
            "set keep_last= (and keep_best=, keep_every=) on the Checkpointer or --keep-last on `ckptd run`, "
            "or `ckptd prune` it")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def apply(root: str, policy: Policy, pinned: Iterable[str] = (), dry_run: bool = False,
          before_delete: Callable[[list[str]], None] | None = None, hold: UploadHold | None = None,
          on_held: Callable[[list[str]], None] | None = None) -> list[str]:
    """Delete what :func:`plan` does not keep; returns the deleted (or, dry run, deletable) names.

    ``before_delete`` gets the names about to go (the trainer tells the supervisor, which then knows the
    deletions it will see are expected); ``on_held`` the names ``hold`` kept (possibly none), at every pass."""
    pins = set(pinned) | store.pinned(root)
    keep, doomed = plan(store.list_checkpoints(root), policy, pins, hold)
    if on_held is not None:
        on_held(held(keep))
    if dry_run:
        return [i.name for i in doomed]
    if doomed and before_delete is not None:
        before_delete([i.name for i in doomed])
    return [i.name for i in doomed if store.delete(root, i.name)]


def remove_stale_trash(root: str) -> list[str]:
    """Remove the ``.trash-*`` directories a deletion left when it was killed between its rename and its rmtree.

    Looks with lstat only: a ``.trash-*`` entry that is a symlink or not a directory is left alone, and the
    removal never follows a link (``shutil.rmtree`` walks with directory file descriptors and refuses a link).
    What another remover takes away meanwhile is not an error. Returns the removed names, oldest first by name;
    raises ``OSError`` when a directory cannot be removed (read-only file system, permissions).
    """
    try:
        entries = sorted((e for e in os.scandir(root)
                          if e.name.startswith(store.TRASH_PREFIX) and e.is_dir(follow_symlinks=False)),
                         key=lambda e: e.name)
    except FileNotFoundError:
        return []
    removed = []
    for e in entries:
        if sys.version_info >= (3, 12):
            shutil.rmtree(e.path, onexc=_raise_unless_gone)
        else:
            shutil.rmtree(e.path, onerror=lambda f, p, info: _raise_unless_gone(f, p, info[1]))
        removed.append(e.name)
    return removed


def _raise_unless_gone(func: object, path: str, exc: BaseException) -> None:
    if not isinstance(exc, FileNotFoundError):
        raise exc
