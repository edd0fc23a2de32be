"""Periodic checkpoint requests: an APScheduler 3.x BackgroundScheduler whose jobs only post to the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Schedules:
    """Interval (``every``) and cron (``cron``) jobs; each firing calls ``post(("schedule", job_id))``."""

    def __init__(self, post: Callable[[tuple], None]) -> None:
        self._post = post
        self._scheduler: Any = None  # a BackgroundScheduler once a job is wanted (APScheduler 3.x is untyped)
        self.active: dict[str, str] = {}

    def apply(self, every: float | None, cron: str | None) -> dict[str, str]:
        """(Re)configure the jobs; returns ``{job id: description}`` now active."""
        wanted = {}
        if every:
            wanted["every"] = f"every {every:g} s"
        if cron:
            wanted["cron"] = f"cron '{cron}'"
        if wanted == self.active:
            return self.active
        if self._scheduler is None and wanted:
            from apscheduler.schedulers.background import BackgroundScheduler

            self._scheduler = BackgroundScheduler(daemon=True, job_defaults={
                "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
            self._scheduler.start()
        if self._scheduler is not None:
            self._scheduler.remove_all_jobs()
            if every:
                from apscheduler.triggers.interval import IntervalTrigger

                self._scheduler.add_job(self._post, IntervalTrigger(seconds=every), args=[("schedule", "every")],
                                        id="every")
            if cron:
                from apscheduler.triggers.cron import CronTrigger

                self._scheduler.add_job(self._post, CronTrigger.from_crontab(cron), args=[("schedule", "cron")],
                                        id="cron")
        self.active = wanted
        return wanted

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
