"""The background uploader: the local directory's newest checkpoint, copied to the object-store tier.

Local first, then upload: a checkpoint commits locally exactly as without a remote tier; the uploader is told
(``notify()``) or finds (a rescan at each wake-up) that a newer valid checkpoint exists and uploads it with
``RemoteTier.upload`` on its own thread. It always takes the newest: when saves come faster than uploads, the
ones in between are skipped (the newest is what a lost machine resumes from). Uploads are paced (``pace`` x
the time of each part, as the disk persist is) until ``hurry()`` (a stop that waits for the upload). A failure
(server down, partition, expired credentials, full bucket) is reported through ``on_event`` and retried with
exponential backoff, for as long as the uploader runs; training is never blocked. With a retention ``policy``
(the remote tier's own, apart from the local one's) each committed upload is followed by a prune of the remote tier
(``RemoteTier.prune``: manifest first; the newest valid remote checkpoint always stays); a prune that fails is
reported like an upload failure and tried again after the next upload. What the remote tier holds is recorded in
the local directory (``store.mark_remote``, durably, after each remote commit and at start from a listing) for
the local retention that waits for the upload (``retention.UploadHold``), the trainer's and the supervisor's.
Nothing here imports torch: the supervisor and the library can both run one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import retention, store
from .errors import CkptdError
from .remote import RemoteTier

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class UploadStatus:
    """What the remote tier holds compared with the local one (for the journal, status and /metrics)."""

    remote_step: int | None = None  # newest checkpoint known to be committed remotely
    remote_created: float | None = None
    local_step: int | None = None  # newest valid local checkpoint seen
    local_created: float | None = None
    uploading: str | None = None  # name of the checkpoint being uploaded
    uploads: int = 0
    failures: int = 0  # failed attempts since the uploader started
    last_error: str = ""
    last_bytes_per_second: float | None = None
    errors_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the last uploads (bounded)

    def transfer_rate(self, last: int = 3) -> float | None:
        """Bytes per second the last ``last`` uploads moved while transferring (the pacing's pauses left out: what
        an upload at full speed, as a stop's, can expect); None before any upload of this uploader."""
        recent = [h for h in self.history if h.get("bytes") and h.get("transfer_seconds")][-last:]
        seconds = sum(h["transfer_seconds"] for h in recent)
        return sum(h["bytes"] for h in recent) / seconds if recent and seconds > 0 else None

    @property
    def lag_steps(self) -> int:
        if self.local_step is None:
            return 0
        return max(0, self.local_step - (self.remote_step if self.remote_step is not None else 0))

    @property
    def current(self) -> bool:
        """The remote tier holds the newest local checkpoint (or a newer one): nothing to upload."""
        if self.local_step is None:
            return True
        if self.remote_step is None:
            return False
        return (self.remote_step, self.remote_created or 0.0) >= (self.local_step, self.local_created or 0.0)

    def lag_seconds(self, now: float) -> float:
        """How old the newest local checkpoint not on the remote tier is (0 when the remote tier is current)."""
        if self.local_created is None:
            return 0.0
        if self.remote_created is not None and self.remote_created >= self.local_created:
            return 0.0
        return max(0.0, now - self.local_created)


class Uploader:
    HISTORY = 20

    def __init__(self, tier: RemoteTier, root: str, *, pace: float = 1.0, on_event: Event | None = None,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, rescan: float = 30.0,
                 policy: retention.Policy | None = None) -> None:
        self.tier, self.root, self.pace = tier, root, pace
        self.policy = policy if policy is not None and policy.active else None
        self.on_event = on_event or (lambda name, fields: None)
        self.backoff_base, self.backoff_max, self.rescan = backoff_base, backoff_max, rescan
        self.status = UploadStatus()
        self._cv = threading.Condition()
        self._wake = False
        self._closed = False
        self._hurry = threading.Event()
        self._paused = 0.0  # seconds the upload under way spent in pacing pauses
        self._uploaded: set[tuple[int, float]] = set()  # (step, created) of the local checkpoints uploaded
        self._thread = threading.Thread(target=self._run, name="ckptd-uploader", daemon=True)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def notify(self) -> None:
        """A checkpoint was committed locally: look for it now."""
        with self._cv:
            self._wake = True
            self._cv.notify_all()

    def hurry(self) -> None:
        """Stop pacing (the uploads from now on run at full speed): somebody waits for the remote tier."""
        self._hurry.set()
        self.notify()

    def wait_uploaded(self, step: int, timeout: float) -> bool:
        """Wait until a checkpoint of ``step`` or newer is committed remotely (False when ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.status.remote_step is None or self.status.remote_step < step:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cv.wait(min(left, 1.0))
        return True

    def wait_for(self, step: int, created: float, timeout: float, cancelled: Callable[[], bool] = lambda: False
                 ) -> bool:
        """Wait until the local checkpoint (``step``, ``created``) or a newer one is committed remotely; False when
        ``timeout`` passes or ``cancelled()`` says so (asked at least every 0.2 s)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self.status.remote_step is None
                   or (self.status.remote_step, self.status.remote_created or 0.0) < (step, created)):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or cancelled():
                    return False
                self._cv.wait(min(left, 0.2))
        return True

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._hurry.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            newest = self.tier.latest_valid()
        except CkptdError as exc:  # what an earlier run recorded stays: the best knowledge there is
            self._failed("list", exc)
        else:
            self._mark(newest)
            if newest is not None:
                self.status.remote_step, self.status.remote_created = newest.step, newest.created
                self._uploaded.add((newest.step, newest.created))
        delay = 0.0
        while True:
            with self._cv:
                if not self._wake and not self._closed:
                    self._cv.wait(delay if delay > 0 else self.rescan)
                self._wake = False
                if self._closed:
                    return
            candidate = self._newest_local()
            if candidate is None or (candidate.step, candidate.created) in self._uploaded:
                delay = 0.0
                continue
            if self.status.remote_step is not None and (candidate.step, candidate.created) < \
                    (self.status.remote_step, self.status.remote_created or 0.0):
                delay = 0.0
                continue
            if self._upload(candidate):
                delay = 0.0
                with self._cv:
                    self._wake = True  # another may have committed meanwhile
            else:
                n = self.status.errors_in_a_row
                delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, n - 1))

    def _newest_local(self) -> store.CheckpointInfo | None:
        try:
            valid = [i for i in store.list_checkpoints(self.root) if i.valid]
        except (CkptdError, OSError) as exc:
            self._failed("scan", exc)
            return None
        if not valid:
            return None
        newest = valid[-1]
        self.status.local_step, self.status.local_created = newest.step, newest.created
        return newest

    def _upload(self, info: store.CheckpointInfo) -> bool:
        self.status.uploading = info.name
        self.on_event("upload_started", {"checkpoint": info.name, "step": info.step, "bytes": info.bytes})
        t0 = time.monotonic()
        self._paused = 0.0
        try:
            rc = self.tier.upload(info.path, pause=self._pause)
        except (CkptdError, OSError) as exc:
            if not os.path.isdir(info.path):  # retention removed it meanwhile: nothing failed, a newer one exists
                self.status.uploading = None
                return True
            self.status.uploading = None
            self._failed("upload", exc, checkpoint=info.name)
            return False
        seconds = max(time.monotonic() - t0, 1e-9)
        transfer = max(seconds - self._paused, 1e-9)
        with self._cv:
            self._uploaded.add((info.step, info.created))
            self.status.remote_step, self.status.remote_created = rc.step, rc.created
            self.status.uploading = None
            self.status.uploads += 1
            self.status.errors_in_a_row = 0
            self.status.last_bytes_per_second = rc.bytes / seconds
            self.status.history = [*self.status.history, {"step": rc.step, "key": rc.key, "bytes": rc.bytes,
                                                          "seconds": round(seconds, 3),
                                                          "transfer_seconds": transfer}][-self.HISTORY:]
            self._cv.notify_all()
        self._mark(rc)
        self.on_event("upload_committed", {"checkpoint": info.name, "step": rc.step, "key": rc.key, "bytes": rc.bytes,
                                           "seconds": round(seconds, 3), "transfer_seconds": round(transfer, 3)})
        self._prune()
        return True

    def _mark(self, rc: Any) -> None:
        """Record in the local directory what the remote tier holds (``rc``: a RemoteCheckpoint, or None when it
        holds nothing), before the commit is reported: the retention pass the report starts reads it. A record
        that cannot be written leaves the older one, so retention holds more back, never less."""
        try:
            if rc is None:
                store.clear_remote_mark(self.root)
            else:
                store.mark_remote(self.root, self.tier.spec.url, rc.key, rc.step, rc.created)
        except (CkptdError, OSError) as exc:
            self._failed("record", exc)

    def _prune(self) -> None:
        """The remote tier's retention, after an upload committed (an upload never waits for it). Stale prefixes of
        uploads that never committed are left to ``ckptd prune --remote``: one of another uploader may be in flight."""
        if self.policy is None:
            return
        try:
            _, deleted, _ = self.tier.prune(self.policy, stale_after=float("inf"))
        except (CkptdError, OSError) as exc:
            self._failed("prune", exc)
            return
        if deleted:
            self.on_event("remote_pruned", {"keys": [rc.key for rc in deleted], "steps": [rc.step for rc in deleted]})

    def _pause(self, part_seconds: float) -> None:
        if self.pace > 0 and not self._hurry.is_set():
            t0 = time.monotonic()
            self._hurry.wait(self.pace * part_seconds)
            self._paused += time.monotonic() - t0

    def _failed(self, op: str, exc: BaseException, **fields: Any) -> None:
        self.status.failures += 1
        self.status.errors_in_a_row += 1
        self.status.last_error = str(exc)
        self.on_event("upload_failed", {"op": op, "error": str(exc), "in_a_row": self.status.errors_in_a_row,
                                        **fields})
