"""The checkpoint directory as the supervisor journals it: what appeared, what was removed and by whom,
what is invalid; the supervisor's own retention (which, with a remote tier, keeps every checkpoint the remote tier
does not cover yet and says so: ``retention_held``); pins of checkpoints a person asked for.

The loop calls :meth:`Directory.rescan` after a burst of file events, before an exit is judged, and when
the core asks (:class:`~ckptd.supervisor.actions.Rescan`); the core gets the result as
:class:`~ckptd.supervisor.actions.Rescanned`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import retention, store
from ..errors import CkptdError
from . import actions as act
from .config import Config
from .uploads import spec_of
from .watch import CheckpointView

MAX_PRUNING = 1024  # names the trainers' retention announced and the directory still shows (bounded)


class Directory:
    def __init__(self, root: str, view: CheckpointView, record: Callable[..., None],
                 log: Callable[..., None]) -> None:
        self.root = root
        self.view = view
        self._record = record  # Supervisor._event: log, journal and count one event
        self._log = log
        self.journaled: set[str] = set()  # checkpoint names already in the journal
        self._retired: set[str] = set()  # names our retention deleted
        self._pruning: dict[str, None] = {}  # names a trainer's retention announced it deletes (insertion order)
        self._latest_step: int | None = None  # of the newest valid checkpoint, as of the last refresh
        self.held: list[str] = []  # what our last retention pass kept only because the remote tier lacks it

    def start(self) -> None:
        self.view.refresh()
        self.journaled.update(self.view.valid)
        self._note_latest()

    def _note_latest(self) -> None:
        latest = self.view.latest()
        self._latest_step = latest.step if latest is not None else None

    def rescan(self, cfg: Config, resumed_from: str | None, emergency_step: int | None = None) -> act.Rescanned:
        changes = self.view.refresh()
        for info in changes.added:
            if info.name not in self.journaled:
                self.journaled.add(info.name)
                self._record("info", "checkpoint", f"checkpoint appeared: {info.name} (step {info.step}, "
                             f"{info.kind})", name=info.name, step=info.step, kind=info.kind, path=info.path,
                             bytes=info.bytes)
        for name in changes.removed:
            # Expected deletions (ours, said once by apply_retention; the trainer's, announced in `pruning`)
            # are journaled without a log line; only an unexpected one is worth the user's attention.
            by = "retention" if name in self._retired else "trainer retention" if name in self._pruning \
                else "someone else"
            self._retired.discard(name)
            self._pruning.pop(name, None)
            self.journaled.discard(name)
            self._record("info", "checkpoint_removed", f"checkpoint {name} removed ("
                         + (by if by != "someone else" else "not by the supervisor nor by the trainer's retention: "
                            "`ckptd prune` or a person") + ")", name=name, by=by, quiet=by != "someone else")
        for info in changes.invalid:
            self._record("warning", "checkpoint_invalid", f"checkpoint {info.name} is invalid: {info.reason}",
                         name=info.name, reason=info.reason)
        self._note_latest()
        latest = self.view.latest()
        emergency = None
        if emergency_step is not None:
            asked = self.view.valid.get(store.checkpoint_name(emergency_step))
            if asked is not None and asked.kind == "emergency":
                emergency = (emergency_step, asked.created)
        if changes.added and cfg.retention_enabled:
            self._apply_retention(cfg, resumed_from)
        return act.Rescanned(
            added=tuple((i.name, i.step, i.kind, i.created) for i in changes.added),
            latest=(latest.name, latest.step, latest.kind, latest.created) if latest is not None else None,
            emergency=emergency)

    def latest_step(self) -> int | None:
        """The newest valid checkpoint's step (every decision's view asks: kept, not searched for)."""
        return self._latest_step

    def committed(self, action: act.Committed) -> bool:
        """A trainer reported a commit; True when it is news for the journal."""
        if action.name in self.journaled and not action.replaced:
            return False
        self.journaled.add(action.name)
        return True

    def pruning(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._pruning[name] = None
        while len(self._pruning) > MAX_PRUNING:  # a name announced but never deleted must not grow it for ever
            del self._pruning[next(iter(self._pruning))]

    def remove_stale_trash(self) -> None:
        """A deletion killed between its rename and its rmtree leaves ``.trash-*``; nothing else removes it."""
        try:
            removed = retention.remove_stale_trash(self.root)
        except OSError as exc:
            self._log("warning", "retention", f"cannot remove leftovers of an interrupted deletion: {exc}")
            return
        if removed:
            self._log("info", "retention", f"removed leftovers of an interrupted deletion: {', '.join(removed)}")

    def retain(self, cfg: Config, resumed_from: str | None) -> None:
        """A retention pass now (an upload committed: what it covers may go)."""
        if cfg.retention_enabled:
            self._apply_retention(cfg, resumed_from)

    def _apply_retention(self, cfg: Config, resumed_from: str | None) -> None:
        policy = retention.Policy(keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                                  keep_best=tuple(retention.Best(m, k, mode) for m, k, mode in cfg.keep_best))
        latest = self.view.latest()
        try:
            pins = {n for n in (latest.name if latest else None, resumed_from) if n}
            hold = retention.UploadHold(store.remote_mark(self.root, spec_of(cfg).url)) if cfg.upload_hold else None
            deleted = retention.apply(self.root, policy, pinned=pins, hold=hold,
                                      on_held=lambda names: self._held(names, hold))
        except (OSError, CkptdError) as exc:
            self._log("error", "retention", f"retention failed, will retry after the next checkpoint: {exc}")
            return
        if deleted:
            self._retired.update(deleted)
            self._log("info", "retention", f"retention deleted {', '.join(deleted)}")

    def _held(self, names: list[str], hold: retention.UploadHold | None) -> None:
        """Journal each change of what retention keeps back for the upload (the log line once per stretch)."""
        if names == self.held or hold is None:
            return
        before, self.held = self.held, names
        remote = f"step {hold.remote[0]}" if hold.remote else "none yet"
        if names:
            self._record("info", "retention_held", f"retention keeps {len(names)} checkpoint(s) the remote tier does "
                         f"not have yet ({', '.join(names)}; its newest: {remote}) until an upload covers them",
                         names=names, remote_step=hold.remote[0] if hold.remote else None, quiet=bool(before))
        else:
            self._record("info", "retention_held", f"the remote tier covers every checkpoint retention had kept "
                         f"back (its newest: {remote})", names=[],
                         remote_step=hold.remote[0] if hold.remote else None)

    def pin(self, name: str) -> None:
        """A checkpoint a person asked for is kept until a person removes it: pinned (``.pins/``), so neither
        retention (the trainer's or ours) nor `ckptd prune` deletes it; `ckptd pin --remove` lets it go."""
        if store.NAME_RE.match(name) and os.path.isdir(os.path.join(self.root, name)):
            store.pin(self.root, name)
            self._log("info", "pinned", f"{name} pinned: asked for by a person, kept until `ckptd pin --remove`")

