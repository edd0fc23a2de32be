"""The supervisor's side of the object-store tier (``--remote``): the background uploader and what it tells.

Local first, then upload: a checkpoint commits locally as without a remote tier; the loop only calls
:meth:`RemoteUploads.notify` when one is committed or appears, and the uploader thread (ckptd/uploader.py)
does every network operation. Its reports are posted to the loop's queue (``("upload", event, fields)``)
and journaled there: ``upload_started``, ``upload_committed``, ``upload_failed``, ``remote_pruned`` (the remote
tier's own retention, ``remote_keep_*``, applied after each upload). Nothing here waits on the
network except :meth:`RemoteUploads.wait_stopped`, which a stop with ``stop_upload: wait`` calls after the
child is gone, bounded by the stop's deadline. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import retention, store
from ..remote import RemoteSpec, RemoteTier
from ..uploader import Uploader
from .config import Config

FAILURE_LOG_EVERY = 10  # a failure in a row is logged the first time and every 10th; all are journaled


class RemoteUploads:
    def __init__(self, cfg: Config, root: str, post: Callable[[tuple], None]) -> None:
        assert cfg.remote is not None
        self.spec = spec_of(cfg)
        self.tier = RemoteTier(self.spec)  # no network here: a bad setting is an error before anything starts
        self.root = root
        self.uploader = Uploader(self.tier, root, on_event=lambda name, fields: post(("upload", name, fields)),
                                 policy=remote_policy(cfg))

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
                "last_bytes_per_second": st.last_bytes_per_second}

    def lag(self, local: tuple[int, float] | None, now: float) -> tuple[bool, int, float]:
        """(the remote tier holds the newest local checkpoint or a newer one, steps behind, seconds behind)."""
        st = self.uploader.status
        remote = (st.remote_step, st.remote_created or 0.0) if st.remote_step is not None else None
        if local is None or (remote is not None and remote >= local):
            return True, 0, 0.0
        return False, max(0, local[0] - (remote[0] if remote else 0)), max(0.0, now - local[1])

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
