"""Prometheus metrics of a supervised run: the one module that defines them (docs/metrics.md).

The supervisor serves them with prometheus-client on ``metrics.addr`` (default ``127.0.0.1:9477``); the
trainer opens no port: its figures (steps, save timings, the metrics passed to ``ck.step``) arrive over the
control channel, in the heartbeat (at most 1/s) and in ``saved``/``restored``. Every metric lives on a
:class:`~prometheus_client.CollectorRegistry` passed in, never the global default one.

    >>> from prometheus_client import CollectorRegistry
    >>> from ckptd.supervisor.clock import Clock
    >>> reg = CollectorRegistry()
    >>> m = RunMetrics(reg, Clock())
    >>> m.on_event("checkpoint", {"kind": "periodic", "step": 10})
    >>> reg.get_sample_value("ckptd_checkpoints_total", {"kind": "periodic", "result": "ok"})
    1.0

Labels come only from the fixed tuples below (``ckptd_train_metric{name}``: at most
:data:`MAX_TRAIN_METRICS` names, the first ones seen), so the number of series of a run stays constant.

Threads: the loop calls every ``on_*`` method; the HTTP server threads only read (prometheus-client's
metric objects are thread-safe, :class:`Goodput` takes a lock).

The port is open to every local user (and to the network with a wildcard address), so it serves what
Prometheus and a health check need and nothing else: ``/metrics`` and ``/healthz``. The run's details
(command line, config, pids, paths, stacks) go through the owner-only control socket (``ckptd status``).
Everything a client can make the server hold is bounded (docs/metrics.md, "Bounds"): connections at once
(:func:`max_connections`, well below the fd limit, so the supervisor keeps the descriptors it needs), the
time of a whole connection (REQUEST_DEADLINE, from accept to the last byte of the answer, however slowly
the client sends), and so the number of threads.

Over 600 lines on purpose: it is the one module that defines metrics (the definitions, the goodput account
and the bounded server that serves them); the supervisor's use of the port is endpoint.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app

from ..version import __version__
from .policy import is_step

DEFAULT_PORT = 9477  # docs/metrics.md, "Port": not a port of the exporters found on GPU nodes
DEFAULT_ADDR = f"127.0.0.1:{DEFAULT_PORT}"
REQUEST_DEADLINE = 10.0  # seconds a connection may last, from accept to the end of the answer (docs/metrics.md)
MAX_CONNECTIONS = 64  # HTTP connections at once, at most; fewer under a low fd limit (max_connections)
FDS_PER_CONNECTION = 16  # ... at most 1/16 of RLIMIT_NOFILE: the rest stays for the supervisor's own work
ADMIT_WAIT = 1.0  # seconds a new connection may wait for cut ones to end before it is refused
ACCEPT_PAUSE = 0.5  # seconds the listener rests after accept() failed (EMFILE, ENFILE, ENOMEM), not spinning
RENDER_RATE = 50.0  # /metrics answers per second at most; more wait their turn (docs/metrics.md)
RENDER_WAIT = 2.0  # seconds a request may wait for its turn; beyond that: 429 with Retry-After

KINDS = ("periodic", "manual", "emergency", "final")  # store.KINDS
RESULTS = ("ok", "failed")
FAILURE_REASONS = ("no_space", "io_error", "error", "deadline")
RESTART_REASONS = ("error", "signal", "oom", "hang")  # policy.Reason values that lead to a restart
NOTICE_SOURCES = ("signal", "requeue", "aws", "gcp", "azure")
STATES = ("starting", "running", "stopping", "backoff", "finished", "stopped", "gave_up")
MAX_TRAIN_METRICS = 16
TRAIN_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,63}\Z")

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

NAN = float("nan")


class Goodput:
    """The share of the run's wall time that produced steps that are still kept (docs/metrics.md, "Goodput").

    Per life (one start of the training script): training time is from the trainer being ready (its
    ``restored`` report, or its ``hello`` when there was nothing to restore) to its last step report, less
    the time saves stalled the loop; it is credited in proportion to the steps of that life that are kept
    (``(computed - lost) / computed``). Startup, restores, backoff and stops earn nothing. ``carried`` holds
    the figures of earlier ``ckptd run`` invocations of the same run (from state.json).
    """

    def __init__(self, now: float, carried: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._started = now
        carried = carried or {}
        self._carried_wall = _non_negative(carried.get("wall_seconds"))
        self._productive = _non_negative(carried.get("productive_seconds"))
        self._life: dict[str, Any] | None = None
        self._ended: tuple[dict[str, Any], int] | None = None  # the life that ended last, and its lost steps
        self._frozen: float | None = None  # when training ended: the wall time stops there (the linger is no run)

    def resume(self, carried: Any) -> None:
        """Add the figures of earlier ``ckptd run`` invocations of this run (state.json's ``goodput``)."""
        if isinstance(carried, dict):
            with self._lock:
                self._carried_wall += _non_negative(carried.get("wall_seconds"))
                self._productive += _non_negative(carried.get("productive_seconds"))

    def life_started(self) -> None:
        with self._lock:
            self._life = {"t_base": None, "base": 0, "t_last": None, "last": None, "stall": 0.0}

    def ready(self, now: float, step: int) -> None:
        """The trainer of this life is ready to train from ``step`` (restored, or connected at 0)."""
        with self._lock:
            life = self._life
            if life is not None and life["last"] is None:
                life["t_base"], life["base"] = now, step

    def step(self, now: float, step: int) -> None:
        with self._lock:
            life = self._life
            if life is None or life["t_base"] is None:
                return
            if life["last"] is None or step > life["last"]:
                life["t_last"], life["last"] = now, step

    def stall(self, seconds: float) -> None:
        with self._lock:
            if self._life is not None:
                self._life["stall"] += max(0.0, seconds)

    def life_ended(self, lost_steps: int) -> None:
        with self._lock:
            if self._life is not None:
                self._productive += _life_productive(self._life, lost_steps)
                self._ended = (self._life, lost_steps)
            self._life = None

    def more_lost(self, steps: int) -> None:
        """The life that ended last lost ``steps`` more than counted when it ended (the next one resumed
        from an older checkpoint than the newest: the newest did not verify)."""
        with self._lock:
            if self._ended is not None and steps > 0:
                life, lost = self._ended
                self._productive += _life_productive(life, lost + steps) - _life_productive(life, lost)
                self._ended = (life, lost + steps)

    def freeze(self, now: float) -> None:
        """Training ended (finished, stopped, gave up): the figures stay as they are now, so the final state
        served during ``metrics.linger`` and written to state.json is the run's, not a ratio that keeps falling."""
        with self._lock:
            if self._frozen is None:
                self._frozen = now

    def totals(self, now: float) -> tuple[float, float]:
        """``(productive_seconds, wall_seconds)`` so far, the current life counted as kept."""
        with self._lock:
            if self._frozen is not None:
                now = min(now, self._frozen)
            current = _life_productive(self._life, 0) if self._life is not None else 0.0
            return self._productive + current, self._carried_wall + max(0.0, now - self._started)

    def ratio(self, now: float) -> float:
        productive, wall = self.totals(now)
        return min(1.0, productive / wall) if wall > 0 else 0.0

    def carry(self, now: float) -> dict[str, float]:
        productive, wall = self.totals(now)
        return {"wall_seconds": round(wall, 3), "productive_seconds": round(productive, 3)}


def _life_productive(life: dict[str, Any], lost: int) -> float:
    if life["t_base"] is None or life["last"] is None:
        return 0.0
    computed = life["last"] - life["base"]
    if computed <= 0:
        return 0.0
    kept = max(0, computed - max(0, lost))
    return max(0.0, life["t_last"] - life["t_base"] - life["stall"]) * kept / computed


def _non_negative(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0.0


class RunMetrics:
    """Every ``ckptd_*`` metric of one supervised run, on ``registry``; fed by the supervisor's loop."""

    def __init__(self, registry: CollectorRegistry, clock: Any, *, carried: dict[str, Any] | None = None,
                 latest_step: Callable[[], int | None] = lambda: None) -> None:
        disable_created_metrics()  # no `_created` series: they double the series and nothing here reads them
        self.registry = registry
        self.clock = clock
        self.goodput = Goodput(clock.monotonic(), carried)
        self._latest_step = latest_step
        self._life_max: int | None = None  # the highest step reported in this life (steps_total counts above it)
        self._life_hang = False
        self._stop_failed = False  # the current stop already counted a missed deadline
        self._timed: set[str] = set()  # checkpoints whose save timings were observed
        self._train_names: set[str] = set()
        self._train_refused: set[str] = set()
        self._requests: dict[str, float] = {}  # save request id -> monotonic time asked
        self._stop_asked: float | None = None
        self._stop_deadline: float | None = None
        self.state = "starting"
        r = registry
        Gauge("ckptd_info", "ckptd build information (always 1).", ["version"], registry=r).labels(__version__).set(1)
        self.child_up = Gauge("ckptd_child_up", "1 while the training script's process runs, else 0.", registry=r)
        self.state_g = Gauge("ckptd_state", "1 for the run's current state, 0 for the others.", ["state"], registry=r)
        self.training_step = Gauge("ckptd_training_step", "The last completed step the trainer reported.",
                                   registry=r)
        self.steps = Counter("ckptd_steps", "Training steps completed, recomputed ones included.", registry=r)
        self.checkpoints = Counter("ckptd_checkpoints", "Checkpoints by kind and result (ok: committed).",
                                   ["kind", "result"], registry=r)
        self.duration = Histogram("ckptd_checkpoint_duration_seconds", "Time from a checkpoint's request to its "
                                  "durable commit.", buckets=DURATION_BUCKETS, registry=r)
        self.stall_h = Histogram("ckptd_checkpoint_stall_seconds", "Time a save blocked the training loop "
                                 "(snapshot).", buckets=STALL_BUCKETS, registry=r)
        self.bytes = Gauge("ckptd_checkpoint_bytes", "Size of the last committed checkpoint.", registry=r)
        self.last_ts = Gauge("ckptd_last_checkpoint_timestamp_seconds", "Unix time of the newest valid "
                             "checkpoint; 0 when there is none.", registry=r)
        self.last_step = Gauge("ckptd_last_checkpoint_step", "Step of the newest valid checkpoint; -1 when "
                               "there is none.", registry=r)
        self.start_ts = Gauge("ckptd_start_time_seconds", "Unix time this supervisor started.", registry=r)
        self.failures = Counter("ckptd_checkpoint_failures", "Checkpoints that failed, by reason.", ["reason"],
                                registry=r)
        self.restarts = Counter("ckptd_restarts", "Restarts of the training script, by the reason of the exit.",
                                ["reason"], registry=r)
        self.restore = Gauge("ckptd_restore_seconds", "Duration of the trainer's last restore(); NaN before "
                             "one.", registry=r)
        self.notices = Counter("ckptd_preemption_notices", "Preemption warnings: stop signals and cloud notices.",
                               ["source"], registry=r)
        self.margin = Gauge("ckptd_emergency_checkpoint_margin_seconds", "Deadline minus commit time of the last "
                            "emergency checkpoint (negative: too late); NaN before one.", registry=r)
        self.lost = Counter("ckptd_lost_steps", "Steps computed and then lost (recomputed after a restart).",
                            registry=r)
        self.valid = Gauge("ckptd_valid_checkpoints", "Valid checkpoints in the checkpoint directory.", registry=r)
        goodput = Gauge("ckptd_goodput_ratio", "Share of the run's wall time that produced steps still kept.",
                        registry=r)
        goodput.set_function(lambda: self.goodput.ratio(self.clock.monotonic()))
        self.remote_lag_steps = Gauge("ckptd_remote_lag_steps", "Steps of the newest local checkpoint not yet on the "
                                      "object-store tier (0: it is there); NaN without a remote tier.", registry=r)
        self.remote_lag_seconds = Gauge("ckptd_remote_lag_seconds", "Age of the newest local checkpoint not yet on the "
                                        "object-store tier (0: it is there); NaN without a remote tier.", registry=r)
        self.remote_bytes = Counter("ckptd_remote_upload_bytes", "Bytes of checkpoints committed to the object-store "
                                    "tier.", registry=r)
        self.remote_failures = Counter("ckptd_remote_upload_failures", "Failed operations of the object-store "
                                       "uploader (list, scan, upload), each retried with backoff.", registry=r)
        self.memory_bytes = Gauge("ckptd_memory_region_bytes", "Size of the memory tier's region (--memory: shared "
                                  "memory the trainer's snapshots go into); 0 without it.", registry=r)
        self.memory_persisted = Counter("ckptd_memory_persisted", "Snapshots the trainer died before committing, "
                                        "written from the memory tier by the supervisor.", registry=r)
        self.memory_slot_bytes = Gauge("ckptd_memory_slot_bytes", "Tensor bytes one of the memory tier's two snapshot "
                                       "slots holds (the region is two of them and their heads); 0 without it.",
                                       registry=r)
        self.memory_snapshot_step = Gauge("ckptd_memory_snapshot_step", "Step of the newest sealed snapshot in the "
                                          "memory tier (what a crash now resumes from, at least); NaN without one.",
                                          registry=r)
        self.memory_snapshot_step.set(math.nan)
        self.train = Gauge("ckptd_train_metric", "The last value of each metric passed to ck.step().", ["name"],
                           registry=r)
        for kind in KINDS:  # every series exists from the start: their number never changes during a run
            for result in RESULTS:
                self.checkpoints.labels(kind, result)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        for reason in RESTART_REASONS:
            self.restarts.labels(reason)
        for source in NOTICE_SOURCES:
            self.notices.labels(source)
        self.restore.set(NAN)
        self.margin.set(NAN)
        self.remote_lag_steps.set(NAN)
        self.remote_lag_seconds.set(NAN)
        self.last_step.set(-1)
        self.start_ts.set(clock.time())
        self.publish(state="idle", stopping=False, exit_code=None, step=None, last_checkpoint=None, valid=0)

    # --- the loop's view, once per tick -----------------------------------------------------------

    def publish(self, *, state: str, stopping: bool, exit_code: int | None, step: int | None,
                last_checkpoint: dict[str, Any] | None, valid: int) -> None:
        self.state = _run_state(state, stopping, exit_code)
        for s in STATES:
            self.state_g.labels(s).set(1 if s == self.state else 0)
        self.child_up.set(1 if state in ("running", "stopping", "killing") else 0)
        if step is not None:
            self.training_step.set(step)
        if last_checkpoint and isinstance(last_checkpoint.get("time"), (int, float)):
            self.last_ts.set(last_checkpoint["time"])
            if isinstance(last_checkpoint.get("step"), int):
                self.last_step.set(last_checkpoint["step"])
        self.valid.set(valid)

    @property
    def healthy(self) -> bool:
        """``/healthz``: training or restarting normally (not stopping, stopped, finished or given up)."""
        return self.state in ("starting", "running", "backoff")

    # --- trainer reports --------------------------------------------------------------------------

    def trainer_connected(self) -> None:
        self.goodput.ready(self.clock.monotonic(), 0)

    def restored(self, step: Any, seconds: Any) -> None:
        if is_step(step):
            self.goodput.ready(self.clock.monotonic(), step)
            if self._life_max is None or step > self._life_max:
                self._life_max = step
        if _is_number(seconds) and seconds >= 0:
            self.restore.set(seconds)

    def step(self, step: int) -> None:
        """A completed step reported by a trainer (heartbeat, saved, stopping)."""
        base = self._life_max if self._life_max is not None else 0
        if step > base:
            self.steps.inc(step - base)
            self._life_max = step
        elif self._life_max is None:
            self._life_max = step
        self.goodput.step(self.clock.monotonic(), step)

    def train_metrics(self, values: Any) -> None:
        if not isinstance(values, dict):
            return
        for name, value in values.items():
            if not _is_number(value) or not isinstance(name, str):
                continue
            if name not in self._train_names:
                if len(self._train_names) >= MAX_TRAIN_METRICS or not TRAIN_METRIC_NAME.match(name):
                    if len(self._train_refused) < 64:  # bounded: a hostile trainer cannot grow it
                        self._train_refused.add(name[:64])
                    continue
                self._train_names.add(name)
            self.train.labels(name).set(value)

    def saved(self, msg: dict[str, Any], name: str) -> None:
        """Timings of a committed checkpoint (once per checkpoint, however often it is reported)."""
        if not name or name in self._timed:
            return
        if len(self._timed) > 4096:
            self._timed.clear()
        self._timed.add(name)
        now = self.clock.monotonic()
        stall = msg.get("stall_seconds")
        if _is_number(stall) and stall >= 0:
            self.stall_h.observe(stall)
            self.goodput.stall(stall)
        seconds = msg.get("seconds")
        asked = [self._requests.pop(i) for i in _ids(msg) if i in self._requests]
        if msg.get("kind") == "emergency" and self._stop_asked is not None:
            asked.append(self._stop_asked)
        duration = max([now - t for t in asked] + ([seconds] if _is_number(seconds) and seconds >= 0 else []),
                       default=None)
        if duration is not None:
            self.duration.observe(duration)
        size = msg.get("bytes")
        if _is_number(size) and size > 0:
            self.bytes.set(size)
        if msg.get("kind") == "emergency" and _is_number(self._stop_deadline):
            margin = self._stop_deadline - self.clock.time()
            self.margin.set(margin)
            if margin < 0:
                self._missed_deadline()

    def save_requested(self, request_id: str) -> None:
        if len(self._requests) > 1024:
            self._requests.clear()
        self._requests[request_id] = self.clock.monotonic()

    def stop_requested(self, deadline: float | None = None) -> None:
        """A stop began; ``deadline`` (unix time) is the one its emergency checkpoint must beat."""
        if self._stop_asked is None:
            self._stop_asked = self.clock.monotonic()
            self._stop_deadline = deadline

    def signal_notice(self, source: str) -> None:
        self.notices.labels(source).inc()

    def training_ended(self) -> None:
        """The run reached its end (finished, stopped or gave up): goodput stops moving."""
        self.goodput.freeze(self.clock.monotonic())

    # --- journal events ---------------------------------------------------------------------------

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(fields)

    def _on_spawn(self, fields: dict[str, Any]) -> None:
        self._life_max, self._life_hang = None, False
        self.goodput.life_started()

    def _on_restart(self, fields: dict[str, Any]) -> None:
        reason = fields.get("reason")
        self.restarts.labels(reason if reason in RESTART_REASONS else "error").inc()
        self._on_spawn(fields)

    def _on_exit(self, fields: dict[str, Any]) -> None:
        step = fields.get("step")
        lost = 0
        if fields.get("reason") != "finished" and is_step(step):
            latest = self._latest_step()
            lost = step if latest is None else max(0, step - latest)
        if lost:
            self.lost.inc(lost)
        self.goodput.life_ended(lost)
        self._life_max = None

    def _on_resumed(self, fields: dict[str, Any]) -> None:
        """Steps the restart's count missed: the trainer resumed ``more_lost_steps`` before the newest checkpoint."""
        more = fields.get("more_lost_steps")
        if is_step(more) and more > 0:
            self.lost.inc(more)
            self.goodput.more_lost(more)

    def _on_checkpoint(self, fields: dict[str, Any]) -> None:
        kind = fields.get("kind") if fields.get("kind") in KINDS else "manual"
        self.checkpoints.labels(kind, "ok").inc()
        size = fields.get("bytes")
        if _is_number(size) and size > 0:
            self.bytes.set(size)

    def _on_save_failed(self, fields: dict[str, Any]) -> None:
        kind = fields.get("kind") if fields.get("kind") in KINDS else "manual"
        self.checkpoints.labels(kind, "failed").inc()
        self.failures.labels(_failure_reason(fields.get("errno"))).inc()

    def remote_lag(self, steps: int, seconds: float) -> None:
        """The object-store tier's lag behind the local one (the uploader's view, once per tick)."""
        self.remote_lag_steps.set(steps)
        self.remote_lag_seconds.set(seconds)

    def _on_memory_persisted(self, fields: dict[str, Any]) -> None:
        self.memory_persisted.inc()

    def _on_upload_committed(self, fields: dict[str, Any]) -> None:
        size = fields.get("bytes")
        if _is_number(size) and size > 0:
            self.remote_bytes.inc(size)

    def _on_upload_failed(self, fields: dict[str, Any]) -> None:
        self.remote_failures.inc()

    def _on_emergency_skipped(self, fields: dict[str, Any]) -> None:
        self._missed_deadline()

    def _on_hang(self, fields: dict[str, Any]) -> None:
        self._life_hang = True

    def _on_kill(self, fields: dict[str, Any]) -> None:
        if self._stop_asked is not None and not self._life_hang:  # the grace ran out before the checkpoint
            self._missed_deadline()

    def _on_notice(self, fields: dict[str, Any]) -> None:
        if fields.get("source") in NOTICE_SOURCES and not fields.get("withdrawn"):
            self.notices.labels(fields["source"]).inc()

    def _on_notice_result(self, fields: dict[str, Any]) -> None:
        margin = fields.get("margin_seconds")
        if _is_number(margin):
            self.margin.set(margin)
            if margin < 0:
                self._missed_deadline()

    def _missed_deadline(self) -> None:
        if not self._stop_failed:
            self._stop_failed = True
            self.checkpoints.labels("emergency", "failed").inc()
            self.failures.labels("deadline").inc()

    def memory(self, region_bytes: int, slot_bytes: int, snapshot_step: int | None) -> None:
        """The memory tier as the supervisor sees it (its region's headers, not verified)."""
        self.memory_bytes.set(region_bytes)
        self.memory_slot_bytes.set(slot_bytes)
        self.memory_snapshot_step.set(math.nan if snapshot_step is None else snapshot_step)

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        return {"goodput_ratio": round(self.goodput.ratio(now), 4), "goodput": self.goodput.carry(now),
                "train_metrics_refused": sorted(self._train_refused)[:8]}


def _run_state(state: str, stopping: bool, exit_code: int | None) -> str:
    if state == "fatal":
        return "gave_up"
    if state == "exited":
        return "finished" if exit_code == 0 else "stopped"
    if state in ("stopping", "killing") or stopping:
        return "stopping"
    if state == "backoff":
        return "backoff"
    return "running" if state == "running" else "starting"


def _failure_reason(err: Any) -> str:
    if err in (errno.ENOSPC, errno.EDQUOT):
        return "no_space"
    if err in (errno.EIO, errno.EROFS, errno.ENXIO):
        return "io_error"
    return "error"


def _ids(msg: dict[str, Any]) -> list[str]:
    ids = msg.get("request_ids")
    if isinstance(ids, list):
        return [str(i) for i in ids if i]
    return [i for i in str(msg.get("request_id") or "").split(",") if i]


def _is_number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- the endpoint ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """What ``ckptd status`` shows about the endpoint."""

    state: str  # serving | unavailable | off
    addr: str | None = None  # the bound HOST:PORT (port 0 resolved)
    error: str | None = None
    sd_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        url = f"http://{self.addr}/metrics" if self.addr else None
        return {"state": self.state, "addr": self.addr, "url": url, "error": self.error, "sd_file": self.sd_file}


def max_connections() -> int:
    """HTTP connections served at once: MAX_CONNECTIONS, or 1/FDS_PER_CONNECTION of the fd limit if lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(2, min(MAX_CONNECTIONS, soft // FDS_PER_CONNECTION))


class Connections:
    """The open HTTP connections, each with its deadline; an outsider cannot make the server hold more.

    At most ``limit`` are served at once. A new one beyond that takes the place of the oldest one still
    sending its request (a slow client loses its slot to a scraper that sends its request at once); when
    every slot is answering, the new one is refused. Sockets taken over or past their deadline are shut
    down, which ends the thread blocked on them; while those threads end, at most ``limit`` more exist.
    """

    def __init__(self, limit: int, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.deadline = limit, deadline
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._open: dict[Any, list] = {}  # socket -> [deadline, still reading its request, shut down]
        self.refused = 0
        self.cut = 0  # shut down: past the deadline, or taken over by a newer connection

    def admit(self, sock: Any) -> bool:
        """Make room for ``sock`` and take it (True), or refuse it (False). Called by the accepting thread;
        it waits up to ADMIT_WAIT for connections cut earlier to end, so threads stay bounded."""
        give_up = time.monotonic() + ADMIT_WAIT
        with self._cond:
            while True:
                live = [(s, e) for s, e in self._open.items() if not e[2]]
                if len(live) < self.limit:
                    break
                reading = [(e[0], s) for s, e in live if e[1]]
                if not reading:
                    self.refused += 1
                    return False  # every slot is answering a request: this one may try again
                if len(self._open) < 2 * self.limit:
                    self._cut(min(reading, key=lambda t: t[0])[1])
                    break
                left = give_up - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    return False
                self._cond.wait(left)  # the threads of cut connections are ending
            self._open[sock] = [self._clock() + self.deadline, True, False]
            return True

    def request_read(self, sock: Any) -> None:
        with self._lock:
            if sock in self._open:
                self._open[sock][1] = False

    def closed(self, sock: Any) -> None:
        with self._cond:
            if self._open.pop(sock, None) is not None:
                self._cond.notify()

    def expire(self) -> None:
        now = self._clock()
        with self._lock:
            for sock, entry in self._open.items():
                if not entry[2] and now >= entry[0]:
                    self._cut(sock)

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def _cut(self, sock: Any) -> None:
        self._open[sock][2] = True
        self.cut += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the thread blocked in recv() or send() on it returns at once
        except OSError:
            pass


class MetricsServer:
    """``/metrics`` and ``/healthz`` on one address, a thread per connection (prometheus-client's WSGI app
    and threading server), every connection bounded (:class:`Connections`). Binding fails softly:
    :attr:`endpoint` says why."""

    def __init__(self, registry: CollectorRegistry, healthy: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._healthy = healthy
        self._clock = clock
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self._pace = Pace(RENDER_RATE, RENDER_WAIT)
        self.connections = Connections(max_connections(), REQUEST_DEADLINE, clock)
        self.endpoint = Endpoint("off")

    def start(self, addr: str) -> Endpoint:
        from wsgiref.simple_server import make_server

        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

        host, port = split_addr(addr)
        conns = self.connections
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family
                request_queue_size = 128  # a burst waits in the kernel's backlog, not in our descriptors

                def get_request(self) -> Any:
                    try:
                        return super().get_request()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                            time.sleep(ACCEPT_PAUSE)  # out of descriptors: rest, do not spin on the listener
                        raise

                def process_request(self, request: Any, client_address: Any) -> None:
                    if not conns.admit(request):
                        _refuse(request)
                        self.shutdown_request(request)
                        return
                    super().process_request(request, client_address)

                def shutdown_request(self, request: Any) -> None:
                    conns.closed(request)
                    super().shutdown_request(request)

                def service_actions(self) -> None:  # serve_forever calls it at least every poll_interval
                    conns.expire()

                def handle_error(self, request: Any, client_address: Any) -> None:
                    pass  # a client that went away or was cut off: its own doing, nothing to log

            class Handler(_SilentHandler):
                timeout = REQUEST_DEADLINE  # per recv; Connections bounds the whole connection

                def parse_request(self) -> bool:
                    ok = super().parse_request()
                    conns.request_read(self.connection)  # request line and headers are in (no body is read)
                    return ok

            self._httpd = make_server(host, port, self._app, Server, handler_class=Handler)
        except OSError as exc:
            self.endpoint = Endpoint("unavailable", addr, f"cannot listen on {addr}: {exc.strerror or exc}")
            return self.endpoint
        bound_port = self._httpd.socket.getsockname()[1]
        self.endpoint = Endpoint("serving", join_addr(host, bound_port))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="ckptd-metrics", daemon=True)
        self._thread.start()
        return self.endpoint

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            ok = self._healthy()
            return _reply(start_response, "200 OK" if ok else "503 Service Unavailable", "text/plain",
                          b"ok\n" if ok else b"not training\n")
        if path in ("/metrics", "/") and not self._pace.wait_turn():
            start_response("429 Too Many Requests", [("Content-Type", "text/plain; charset=utf-8"),
                                                     ("Retry-After", "1")])
            return [f"more than {RENDER_RATE:g} requests per second; scrape less often\n".encode()]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        return _reply(start_response, "404 Not Found", "text/plain",
                      b"not found: try /metrics or /healthz (the run's status: `ckptd status` as its owner)\n")

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()  # returns once serve_forever has stopped (within poll_interval)
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(2.0)


def _refuse(sock: Any) -> None:
    """Tell a connection over the limit why, without waiting for it (it may not read)."""
    try:
        sock.setblocking(False)
        sock.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
    except OSError:
        pass


class Pace:
    """At most ``rate`` turns per second, handed out in order of arrival: a request waits for its turn
    (a scrape storm is served at ``rate``, so it cannot take the host's CPU from training) or, when its
    turn is more than ``max_wait`` seconds away, is refused. /healthz is never paced (probes stay cheap)."""

    def __init__(self, rate: float, max_wait: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._gap, self._max_wait = 1.0 / rate, max_wait
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait_turn(self) -> bool:
        with self._lock:
            now = self._clock()
            turn = max(now, self._next)
            if turn - now > self._max_wait:
                return False
            self._next = turn + self._gap
        if turn > now:
            self._sleep(turn - now)
        return True


def _reply(start_response: Callable[..., Any], status: str, ctype: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", f"{ctype}; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- Prometheus file_sd ---------------------------------------------------------------------------


def sd_path(path: str, run_id: str) -> str:
    """``--metrics-sd-file``: a file, or a directory (then one file per run in it)."""
    if path.endswith(os.sep) or os.path.isdir(path):
        return os.path.join(path, f"ckptd-{socket.gethostname()}-{run_id}.json")
    return path


def sd_target(addr: str) -> str:
    """The address Prometheus should scrape: a wildcard bind is reached by this host's name."""
    host, port = split_addr(addr)
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return join_addr(host, port)


def write_sd_file(path: str, addr: str, labels: dict[str, str]) -> None:
    """One target in Prometheus' file_sd format, written atomically (temp, fsync, rename, fsync dir).

    Often as root into a directory Prometheus reads: the directory must be one no other account can write
    (``store.unshared_dir``: else PermissionError saying so), and the write never follows a link
    (``store.replace_file``: a temporary of an unpredictable name, O_EXCL|O_NOFOLLOW, renamed over the file).
    """
    from .. import store

    data = json.dumps([{"targets": [sd_target(addr)], "labels": labels}], indent=1) + "\n"
    store.replace_file(path, data.encode(), 0o644, check=store.unshared_dir, follow_dir=True)


def remove_sd_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
