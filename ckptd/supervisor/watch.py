"""Watch the checkpoint directory (watchdog) and keep the supervisor's view of it current.

The observer thread only posts ``("fs",)`` to the loop (once per burst); the loop rescans with
``store.list_checkpoints`` (manifest-level, cheap) and diffs against what it knew, so commits,
quarantines and deletions made by anyone (the trainer, ``ckptd prune``, a user's ``rm``) are seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import protocol

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver


class DirWatcher:
    def __init__(self, root: str, post: Callable[[tuple], None]) -> None:
        self.root = root
        self._post = post
        self._pending = threading.Event()  # set: a rescan is already queued
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        ignored = protocol.run_dir(self.root) + os.sep
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
                if all(not p or (p + os.sep).startswith(ignored) for p in paths):
                    return  # our own journal/state writes
                if not watcher._pending.is_set():
                    watcher._pending.set()
                    watcher._post(("fs",))

        self._observer = Observer()
        # The top level only: a commit, a quarantine, a prune and a user's rm are each a rename or removal
        # of an entry there. Recursive watching cost one inotify watch per checkpoint directory, an event
        # per file a save writes, and watchdog warned on every directory renamed under it.
        self._observer.schedule(Handler(), self.root, recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def rescan_started(self) -> None:
        """Called by the loop before it rescans: later events queue another rescan."""
        self._pending.clear()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None


@dataclass
class Changes:
    added: list[Any] = field(default_factory=list)  # newly valid checkpoints
    removed: list[str] = field(default_factory=list)  # names gone (deleted, quarantined, pruned)
    invalid: list[Any] = field(default_factory=list)  # present but invalid


class CheckpointView:
    """What the supervisor knows of the checkpoint directory: ``{name: CheckpointInfo}`` of valid ones."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.valid: dict[str, Any] = {}
        self._invalid: set[str] = set()

    def refresh(self) -> Changes:
        from .. import store
        from ..errors import CkptdError

        try:
            infos = store.list_checkpoints(self.root)
        except (OSError, CkptdError):
            return Changes()  # the directory is briefly unreadable or gone: keep what we knew
        changes = Changes()
        now_valid = {i.name: i for i in infos if i.valid}
        # A checkpoint deleted while it was listed (retention, a person) reads as unreadable: it is gone, not invalid.
        now_invalid = {i.name: i for i in infos if not i.valid and os.path.lexists(i.path)}
        changes.added = [i for n, i in now_valid.items() if n not in self.valid]
        changes.removed = [n for n in self.valid if n not in now_valid]
        changes.invalid = [i for n, i in now_invalid.items() if n not in self._invalid]
        self.valid, self._invalid = now_valid, set(now_invalid)
        return changes

    def latest(self) -> Any | None:
        return max(self.valid.values(), key=lambda i: (i.step, i.created), default=None)
