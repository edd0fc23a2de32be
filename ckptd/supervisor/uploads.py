"""The supervisor's side of the object-store tier (``--remote``): the background uploader and what it tells.

Local first, then upload: a checkpoint commits locally as without a remote tier; the loop only calls
:meth:`RemoteUploads.notify` when one is committed or appears, and the uploader thread (ckptd/uploader.py)
does every network operation. Its reports are posted to the loop's queue (``("upload", event, fields)``)
and journaled there: ``upload_started``, ``upload_committed``, ``upload_failed``, ``remote_pruned`` (the remote
tier's own retention, ``remote_keep_*``, applied after each upload). Nothing here waits on the
network except :meth:`RemoteUploads.wait_stopped`, which a stop calls after the child is gone, bounded by the
stop's deadline: with ``stop_upload: wait`` always; with ``skip`` (the default) on a notice with a deadline when
:func:`emergency_upload` says the newest local checkpoint fits in the time left at the measured transfer rate.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import retention, store
from ..remote import RemoteSpec, RemoteTier
from ..uploader import Uploader
from .config import Config

FAILURE_LOG_EVERY = 10  # a failure in a row is logged the first time and every 10th; all are journaled
EMERGENCY_SHARE = 0.8  # an emergency upload is tried when its estimate takes at most this share of the time left


@dataclass(frozen=True)
class EmergencyUpload:
    """Whether a stop before a notice's deadline uploads the emergency checkpoint, and the figures that decided."""

    attempt: bool
    reason: str
    checkpoint: str = ""
    bytes: int = 0
    bytes_per_second: float | None = None  # the measured transfer rate
    estimate_seconds: float | None = None
    seconds_left: float = 0.0


def emergency_upload(name: str, nbytes: int, rate: float | None, left: float, on_remote: bool) -> EmergencyUpload:
    """Upload checkpoint ``name`` (``nbytes``) in the ``left`` seconds before the deadline? Only when the measured
    transfer ``rate`` (bytes/s, None before any upload) says it takes at most EMERGENCY_SHARE of them: an upload
    cut by the deadline commits nothing and only delays the exit the platform is about to force."""
    base = EmergencyUpload(False, "", checkpoint=name, bytes=nbytes, bytes_per_second=rate, seconds_left=round(left, 3))
    if on_remote:
        return dataclasses.replace(base, reason="already on the remote tier")
    if left <= 0:
        return dataclasses.replace(base, reason="no time left before the deadline")
    if not rate:
        return dataclasses.replace(base, reason="no upload has finished in this run yet: no measured rate to judge by")
    estimate = nbytes / rate
    figures = (f"{nbytes / 2**20:.1f} MiB at the measured {rate / 2**20:.1f} MiB/s takes about {estimate:.1f} s, "
               f"{left:.1f} s left")
    fits = estimate <= EMERGENCY_SHARE * left
    reason = f"fits: {figures}" if fits else \
        f"does not fit: {figures} (at most {EMERGENCY_SHARE:.0%} of it may be used)"
    return dataclasses.replace(base, attempt=fits, estimate_seconds=round(estimate, 3), reason=reason)


class RemoteUploads:
    def __init__(self, cfg: Config, root: str, post: Callable[[tuple], None]) -> None:
        assert cfg.remote is not None
        self.spec = spec_of(cfg)
        self.tier = RemoteTier(self.spec)  # no network here: a bad setting is an error before anything starts
        self.root = root
        self.uploader = Uploader(self.tier, root, on_event=lambda name, fields: post(("upload", name, fields)),
                                 policy=remote_policy(cfg))
        self.emergency: EmergencyUpload | None = None  # the decision of a stop before a notice's deadline

    def start(self) -> None:
        self.uploader.start()

    def notify(self) -> None:
        self.uploader.notify()

    def close(self) -> None:
        """The thread is told to stop and not waited for: an upload cut short commits nothing (no manifest)."""
        self.uploader.close(timeout=0.0)

    def record(self, event: str, fields: dict[str, Any]) -> tuple[str, str, bool]:
        """(level, message, quiet) of an uploader report for the log and the journal."""
        url = self.spec.url
        if event == "upload_started":
            return "info", f"uploading {fields.get('checkpoint')} to {url}", True
        if event == "upload_committed":
            return "info", (f"{fields.get('checkpoint')} committed on the remote tier {url}/{fields.get('key')} "
                            f"({fields.get('bytes')} bytes in {fields.get('seconds')} s)"), False
        if event == "remote_pruned":
            return "info", f"remote retention deleted {', '.join(map(str, fields.get('keys') or []))} from {url}", False
        n = fields.get("in_a_row") or 1
        quiet = n != 1 and n % FAILURE_LOG_EVERY != 0
        return "warning", (f"remote tier {url}: {fields.get('op')} failed ({n} in a row; retried with backoff, "
                           f"training goes on): {fields.get('error')}"), quiet

    def status(self, local: tuple[int, float] | None, now: float) -> dict[str, Any]:
        """What ``ckptd status`` shows: which tier holds the newest checkpoint, the lag, the last failure.
        ``local``: (step, created) of the newest valid local checkpoint, as the loop knows it."""
        st = self.uploader.status
        current, steps, seconds = self.lag(local, now)
        remote = (st.remote_step, st.remote_created or 0.0) if st.remote_step is not None else None
        newest = "none" if local is None and remote is None else "remote only" if remote is not None and (
            local is None or remote > local) else "local and remote" if current else "local only"
        return {"url": self.spec.url, "newest_checkpoint_on": newest, "local_step": local[0] if local else None,
                "remote_step": st.remote_step, "lag_steps": steps, "lag_seconds": round(seconds, 3),
                "uploading": st.uploading, "uploads": st.uploads, "failures": st.failures,
                "failures_in_a_row": st.errors_in_a_row, "last_error": st.last_error[:500],
                "last_bytes_per_second": st.last_bytes_per_second, "transfer_bytes_per_second": st.transfer_rate(),
                "emergency_upload": dataclasses.asdict(self.emergency) if self.emergency else None}

    def lag(self, local: tuple[int, float] | None, now: float) -> tuple[bool, int, float]:
        """(the remote tier holds the newest local checkpoint or a newer one, steps behind, seconds behind)."""
        st = self.uploader.status
        remote = (st.remote_step, st.remote_created or 0.0) if st.remote_step is not None else None
        if local is None or (remote is not None and remote >= local):
            return True, 0, 0.0
        return False, max(0, local[0] - (remote[0] if remote else 0)), max(0.0, now - local[1])

    def decide_emergency(self, left: float) -> EmergencyUpload:
        """A stop before a notice's deadline, the child gone: upload the newest local checkpoint (the emergency
        one) in the ``left`` seconds? (:func:`emergency_upload`; remembered for ``status``)."""
        latest = newest_valid(self.root)
        st = self.uploader.status
        if latest is None:
            self.emergency = EmergencyUpload(False, "no valid local checkpoint", seconds_left=round(left, 3))
        else:
            on_remote = st.remote_step is not None and \
                (st.remote_step, st.remote_created or 0.0) >= (latest.step, latest.created)
            self.emergency = emergency_upload(latest.name, latest.bytes, st.transfer_rate(), left, on_remote)
        return self.emergency

    def wait_stopped(self, deadline_in: float, cancelled: Callable[[], bool]) -> tuple[bool, str, int | None]:
        """``stop_upload: wait``: upload the newest local checkpoint at full speed and wait for its remote commit,
        at most ``deadline_in`` seconds. Returns (on the remote tier, checkpoint name, step)."""
        latest = newest_valid(self.root)
        if latest is None:
            return False, "", None
        self.uploader.hurry()
        ok = self.uploader.wait_for(latest.step, latest.created, max(0.0, deadline_in), cancelled)
        return ok, latest.name, latest.step


def remote_policy(cfg: Config) -> retention.Policy:
    """The remote tier's retention (``remote_keep_*``), apart from the local tier's (``keep_*``)."""
    return retention.Policy(keep_last=cfg.remote_keep_last, keep_every=cfg.remote_keep_every,
                            keep_best=tuple(retention.Best(m, k, mode) for m, k, mode in cfg.remote_keep_best))


def spec_of(cfg: Config) -> RemoteSpec:
    assert cfg.remote is not None
    return RemoteSpec.parse(cfg.remote, cfg.remote_endpoint, cfg.remote_region,
                            path_style=False if cfg.remote_virtual_hosted else None)


def newest_valid(root: str) -> store.CheckpointInfo | None:
    if not os.path.isdir(root):
        return None
    valid = [i for i in store.list_checkpoints(root) if i.valid]
    return valid[-1] if valid else None
