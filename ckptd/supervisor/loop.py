"""The Supervisor: one loop that owns the child, and carries out what the core decides.

Signal handlers, the scheduler thread, the file-watcher thread and the cloud-notice poller only put
events on a queue (``queue.SimpleQueue``, safe to use from a signal handler) and wake the selector; the
loop in the main thread does all the work. It turns what happened into typed events (actions.py), asks
the core (core.py: the state machine, the stop protocol, the message handlers; all pure) what they mean,
and carries out the answer: the child's processes (child.py), the control socket (control.py), the
journal, the checkpoint directory (checkpoints.py), the memory tier's region (memory.py), the metrics, systemd.

A little over 600 lines on purpose: it is the one place that does the supervisor's I/O, one short method
per kind of action and event source; the decisions and each kind of I/O's details live in the modules named
above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import selectors
import signal
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

from .. import env as envvars
from .. import exitcodes, memtier, origin, protocol
from ..errors import CkptdError
from . import actions as act
from . import config as configmod
from . import metrics as metricsmod
from . import notices as noticesmod
from . import resume
from .checkpoints import Directory
from .child import ChildRunner, LifeIO
from .clock import Clock
from .config import Config
from .control import ControlServer, Peer
from .core import Core
from .endpoint import MetricsPort, new_registry
from .journal import JOURNAL_NAME, STATE_NAME, Journal, read_json, write_json_atomic
from .log import EventLog, redact_argv
from .memory import MemoryHold
from .notify import CHILD_UNSET, Notifier
from .policy import ExitStatus
from .process import run_command
from .reserve import SpareFd
from .rundir import JobLock, choose_socket_path, node_identity, node_run_dir
from .schedule import Schedules
from .service import Service, ServiceView
from .snapshot import StatusBoard
from .uploads import RemoteUploads
from .watch import CheckpointView, DirWatcher

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
RELOADABLE = ("every", "cron", "keep_last", "keep_every", "keep_best", "hang_timeout", "grace", "force_grace")
FS_DEBOUNCE = 0.2  # seconds: one rescan per burst of file events
IDLE_WAKE = 60.0  # the loop sleeps at most this long when nothing is due


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], *, config_file: str | None = None,
                 overrides: dict[str, Any] | None = None, clock: Clock | None = None,
                 log: EventLog | None = None, command: list[str] | None = None, fresh: bool = False,
                 resume_from: str | None = None, resume_parts: str | None = None, stage: str | None = None) -> None:
        self.cfg = configmod.absolute(cfg)
        self.argv = argv
        self.command = list(command) if command is not None else list(argv)  # as the user typed it (origin.py)
        self.fresh, self.resume_from = fresh, resume_from
        self.resume_parts, self.stage = resume_parts, stage  # passed on to the trainer (env.py)
        self.start_plan: resume.Plan | None = None
        self.config_file = config_file
        self.overrides = overrides or {}
        self.clock = clock or Clock()
        self.log = log or EventLog(cfg.log_format, clock_time=self.clock.time)
        self.root = self.cfg.dir
        self.node = node_identity(self.cfg.job_id, self.cfg.node_rank, argv)  # multi-node: rundir.py
        self.run_dir = node_run_dir(self.root, self.node.rank)
        self.queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.sel = selectors.DefaultSelector()
        self.core = Core(self.cfg)  # every decision (core.py)
        self.spare = SpareFd()  # released around the child-exit work, so EMFILE cannot stop it (reserve.py)
        self.child = ChildRunner(self.sel, self.spare, self._event)
        self.notifier = Notifier.from_env()
        self.service = Service(self.notifier)  # what systemd hears: docs/systemd.md
        self.schedules = Schedules(self.post)
        self.watcher = DirWatcher(self.root, self.post)
        self.view = CheckpointView(self.root)
        self.dir = Directory(self.root, self.view, self._event, self.log)
        self.board = StatusBoard()  # what `ckptd status` is served (snapshot.py)
        self.run_id = ""
        self.started = self.clock.time()
        self._fs_due: float | None = None
        self._wake_w = -1
        self._faults: dict[str, int] = {}  # where the loop caught an unexpected error, how often
        self._state_write_error: str | None = None  # the cause of the last state.json failure logged
        self._exit_fallback: int | None = None  # an exception ended the loop before the core ended the run
        self.journal: Journal | None = None
        self.control: ControlServer | None = None
        self.notices: noticesmod.Poller | None = None
        self.metrics = metricsmod.RunMetrics(new_registry(), self.clock, latest_step=self.dir.latest_step)
        self.port = MetricsPort(self.metrics, self.log)  # /metrics and /healthz (endpoint.py)
        # The object-store tier (uploads.py): its thread does every network operation, the loop never waits on it.
        # Node 0 alone uploads a multi-node job's shared directory (each checkpoint once).
        self.uploads = RemoteUploads(self.cfg, self.root, self.post) if self.cfg.remote and self.node.rank == 0 \
            else None
        self.memory: MemoryHold | None = None  # --memory: the region the trainer snapshots into (memory.py)

    @property
    def exit_code(self) -> int | None:
        code = self.core.led.exit_code
        return code if code is not None else self._exit_fallback

    # --- entry ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until training finishes, stops or gives up; return the exit code of `ckptd run`."""
        lock = JobLock(self.root, self.node)
        lock.acquire()
        try:
            if self._plan_start() is resume.Action.FINISHED:
                return exitcodes.OK
            with self._signals_captured():
                return self._run_locked()
        finally:
            lock.release()

    def _origin_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.as_dict().items() if k != "dir"}

    def _plan_start(self) -> resume.Action:
        """Resume, start anew (moving old checkpoints aside for --fresh), or nothing: resume.plan decides,
        one line says it. Runs under the job lock, before anything starts."""
        from .. import store

        self.view.refresh()
        now = origin.current(self.command, self._origin_config(), 1, self.resume_from)
        self.start_plan = plan = resume.plan(
            self.root, self.view.latest(), now, fresh=self.fresh, resume_from=self.resume_from,
            multi_node=self.node.job_id is not None, writer_busy=store.live_writer(self.root) if self.fresh else "")
        if plan.action is resume.Action.FRESH:
            dest, moved = store.move_aside(self.root, "run")
            if self.resume_from and os.path.dirname(self.resume_from) == self.root:
                self.resume_from = os.path.join(dest, os.path.basename(self.resume_from))  # moved with the rest
            plan.line += f" to {dest} ({len(moved)} entries)"
            self.view.refresh()
        self.log("info", "plan", plan.line, action=plan.action.value, differences=plan.differences)
        return plan.action

    def post(self, event: tuple) -> None:
        """Threads call this; it only queues and wakes the loop."""
        self.queue.put(event)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # pipe full: the loop is awake anyway

    @contextlib.contextmanager
    def _signals_captured(self) -> Iterator[None]:
        wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda mask: _drain(wake_r))
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            self.sel.unregister(wake_r)
            os.close(wake_r)
            os.close(self._wake_w)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.queue.put(("signal", signum))  # nothing else here: no logging, no locks

    def _run_locked(self) -> int:
        self.child.procs.setup()
        previous = read_json(os.path.join(self.run_dir, STATE_NAME)) or {}
        # A run that did not finish (preempted, gave up, supervisor killed) keeps its id when resumed.
        self.run_id = str(previous["run_id"]) if previous.get("exit_code") != 0 and previous.get("run_id") and \
            (self.start_plan is None or self.start_plan.action is not resume.Action.FRESH) else uuid.uuid4().hex[:12]
        if self.run_id == str(previous.get("run_id")):  # goodput counts the whole run, across `ckptd run`s
            self.metrics.goodput.resume((previous.get("metrics") or {}).get("goodput"))
        journal_path = os.path.join(self.run_dir, JOURNAL_NAME)
        self.board.seed(journal_path)
        self.journal = Journal(journal_path, self.clock.time, on_error=self.log)
        self.control = ControlServer(choose_socket_path(self.run_dir), self.sel, self.clock, self._on_message,
                                     self._on_close, self.log)
        self.control.open()
        self.child.socket_dir = self.core.led.socket_dir = os.path.dirname(self.control.path)
        try:
            self._guarded("trash cleanup", self.dir.remove_stale_trash)
            if self.cfg.memory:
                self._open_memory()
            self.dir.start()
            latest = self.view.latest()
            if latest is not None:
                self.core.handle(act.Rescanned(latest=(latest.name, latest.step, latest.kind, latest.created)),
                                 self._view())  # the run's last checkpoint (nothing to carry out yet)
            self.watcher.start()
            if self.uploads is not None:
                self._guarded("remote tier", self.uploads.start)
            self._apply_schedules()
            self._guarded("notices", self._start_notices)
            self._guarded("metrics endpoint", self._start_metrics)
            node = f", {self.node.describe()}" if self.node.job_id is not None else ""
            argv = redact_argv(self.argv)  # secrets on the command line stay out of the log and the journal
            self._event("info", "start", f"supervising {' '.join(argv)} in {self.root} (run {self.run_id}{node})",
                        pid=os.getpid(), argv=argv, dir=self.root, job_id=self.node.job_id,
                        node_rank=self.node.rank,
                        resume_from=latest.step if latest else None, config=self.cfg.as_dict(),
                        metrics=self.port.describe(), **_slurm_env())
            self._decide(act.Start())
            self.service.ready(self._service_view(), self.clock.monotonic(), self.clock.time())
            while not self.core.terminal:
                self._tick()
        finally:
            self._finish()
        assert self.exit_code is not None
        return self.exit_code

    # --- the loop -------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._poll_io(self._guarded("timeout", self._timeout) or 0.0)
        while True:
            try:
                event = self.queue.get_nowait()
            except queue.Empty:
                break
            self._guarded(f"event {event[0]}", self._handle, event)
        self._guarded("timers", self._run_timers)
        self._guarded("metrics", self._publish_metrics)

    def _guarded(self, where: str, fn: Any, *args: Any) -> Any:
        """Run one piece of loop work; an unexpected error is logged (once per place) and supervision goes on.

        Hostile or broken input (a crafted control message, a damaged manifest, a full disk under the
        journal) must never take the supervisor down: it owns the trainer and its emergency checkpoint.
        """
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback; the loop must survive
            n = self._faults[where] = self._faults.get(where, 0) + 1
            if n == 1 or n % 1000 == 0:
                self.log("error", "internal", f"unexpected error in {where} ({type(exc).__name__}: {exc}); "
                         f"supervision continues ({n} so far)",
                         lines=traceback.format_exc(limit=8).rstrip().splitlines())
            return None

    def _poll_io(self, timeout: float) -> int:
        ready = self.sel.select(timeout)
        for key, mask in ready:
            self._guarded("control I/O", key.data, mask)
        return len(ready)

    def _view(self) -> act.View:
        return act.View(self.clock.monotonic(), self.clock.time(),
                        tuple(self.control.trainers()) if self.control else (), self.dir.latest_step())

    def _timeout(self) -> float:
        view = self._view()
        due = [t for t in (self._fs_due, self.service.next_due(), self.core.next_due(view), self.child.stacks_due(),
                           self.control.next_due() if self.control else None) if t is not None]
        return max(0.0, min([IDLE_WAKE + view.now, *due]) - view.now)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "signal" and event[1] == signal.SIGCHLD:
            self._reap()
        elif kind == "signal":
            self._decide(act.SignalReceived(event[1]))
        elif kind == "schedule":
            self._decide(act.ScheduledSave(event[1]))
        elif kind == "fs":
            if self._fs_due is None:
                self._fs_due = self.clock.monotonic() + FS_DEBOUNCE
        elif kind == "notice":
            self._decide(act.NoticeReceived(event[1]))
        elif kind == "notice_log":
            self.log(event[1], "notices", event[2])
        elif kind == "upload" and self.uploads is not None:
            level, msg, quiet = self.uploads.record(event[1], event[2])
            self._event(level, event[1], msg, quiet=quiet, url=self.uploads.spec.url, **event[2])
            if event[1] == "upload_committed":
                self.dir.retain(self.cfg, self.core.led.resumed_from)  # what the upload covers may go now
                self._save_state()  # state.json says which tier holds the newest checkpoint

    def _run_timers(self) -> None:
        now = self.clock.monotonic()
        if self.control is not None:
            self.control.expire()
        life = self.child.life
        if life is not None and life.stacks_due is not None and now >= life.stacks_due:
            self.child.collect_stacks(life)
        if self._fs_due is not None and now >= self._fs_due:
            self._fs_due = None
            self.watcher.rescan_started()
            # A trainer announces its retention's deletions (`pruning`) before it deletes, so the message is in
            # the socket before the file event that follows it: read what is there, then judge the removals.
            self._poll_io(0)
            self._rescan()
        self._decide(act.Timer())
        self.service.tick(self._service_view(), self.clock.monotonic(), self.clock.time())

    # --- carrying out the core's decisions ------------------------------------------------------

    def _decide(self, event: act.Event) -> None:
        """Ask the core what ``event`` means now, and do it. A bug in the core is logged by _guarded; what it
        had decided before the error is still carried out."""
        actions = self._guarded(f"core ({type(event).__name__})", self.core.handle, event, self._view())
        for action in actions if actions is not None else self.core.led.take():
            self._guarded(f"action {type(action).__name__}", self._do, action)

    def _do(self, a: act.Action) -> None:
        if isinstance(a, act.Record):
            self._event(a.level, a.event, a.msg, lines=list(a.lines), quiet=a.quiet, **a.fields)
        elif isinstance(a, act.Log):
            self.log(a.level, a.event, a.msg)
        elif isinstance(a, act.Journal):
            if self.journal is not None:
                self.board.note(self.journal.append(a.event, run_id=self.run_id, **a.fields))
        elif isinstance(a, act.Metric):
            self._metric(a.method, *a.args)
        elif isinstance(a, act.Send):
            self._send(a.peer, a.type, a.close, **a.fields)
        elif isinstance(a, act.SendStatus):
            self._send(a.peer, protocol.STATUS, True, **self.board.serve(self.status()))
        elif isinstance(a, act.SaveState):
            self._save_state()
        elif isinstance(a, act.Spawn):
            self._spawn(a.restarts)
        elif isinstance(a, act.SignalChild):
            self.child.signal(a.signum)
        elif isinstance(a, act.Kill):
            self.child.kill(a.why)
        elif isinstance(a, act.DumpStacks):
            self.child.ask_stacks(a)
        elif isinstance(a, act.Rescan):
            self._rescan(a.emergency_step)
        elif isinstance(a, act.Committed):
            if self.dir.committed(a):
                self._do(a.record)
                self._save_state()
            if self.uploads is not None:
                self.uploads.notify()
        elif isinstance(a, act.Prune):
            self.dir.pruning(a.names)
        elif isinstance(a, act.Pin):
            self.dir.pin(a.name)
        elif isinstance(a, act.Acknowledge):
            if self.notices is not None:
                self.notices.acknowledge(a.event_id)
        elif isinstance(a, act.ServiceStopping):
            self.service.stopping(a.reason)
        elif isinstance(a, act.Requeue):
            self._slurm_requeue()
        elif isinstance(a, act.Reload):
            self._reload()
        # act.Exit: the loop ends when the core's state is terminal

    def _send(self, peer: Peer, type_: str, close: bool, **fields: Any) -> None:
        if self.control is not None:
            self.control.send(peer, type_, **fields)
            if close:
                self.control.close_after_flush(peer)

    def _rescan(self, emergency_step: int | None = None) -> None:
        rescanned = self.dir.rescan(self.cfg, self.core.led.resumed_from, emergency_step)
        if rescanned.added and self.uploads is not None:
            self.uploads.notify()
        self._decide(rescanned)

    # --- the child ------------------------------------------------------------------------------

    def _child_env(self, restarts: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CHILD_UNSET}
        env.update({
            envvars.DIR: self.root,
            envvars.RUN_ID: self.run_id,
            envvars.RESTART_COUNT: str(restarts),
            envvars.CONTROL: self.control.path if self.control else "",
            envvars.STOP_DEADLINE: "",
            envvars.EXIT_ON_STOP: str(exitcodes.PREEMPTED),
            envvars.METRICS: "1" if self.cfg.metrics.addr else "0",
            envvars.ORIGIN: origin.for_env(self.command, self._origin_config(), self.resume_from),
            envvars.RESUME_FROM: self.resume_from or "",
            envvars.RESUME_PARTS: self.resume_parts or "",
            envvars.STAGE: self.stage or "",
            envvars.RETENTION: "1" if self.cfg.retention_enabled else "",
        })
        if self.cfg.remote:  # restore() on a fresh machine takes the newest checkpoint from the remote tier
            env.update({envvars.REMOTE: self.cfg.remote, envvars.REMOTE_ENDPOINT: self.cfg.remote_endpoint or "",
                        envvars.REMOTE_REGION: self.cfg.remote_region or "",
                        envvars.REMOTE_VIRTUAL_HOSTED: "1" if self.cfg.remote_virtual_hosted else "",
                        envvars.UPLOAD_HOLD: "1" if self.cfg.upload_hold else ""})
        if self.cfg.every_steps:
            env[envvars.EVERY_STEPS] = str(self.cfg.every_steps)
        if self.cfg.keep_last:
            env[envvars.KEEP_LAST] = str(self.cfg.keep_last)
        if self.memory is not None:
            env[envvars.MEMORY_FD] = str(memtier.CHILD_FD)
            if self.cfg.snapshot_every_steps:  # only with the region: the trainer refuses it without one
                env[envvars.SNAPSHOT_EVERY_STEPS] = str(self.cfg.snapshot_every_steps)
        if self.cfg.key_file:  # the path only: the trainer reads the key itself
            env[envvars.KEY_FILE] = self.cfg.key_file
            env[envvars.ALLOW_UNKEYED] = "1" if self.cfg.allow_unkeyed else ""
        return env

    def _spawn(self, restarts: int) -> None:
        try:
            pid = self.child.spawn(self.argv, self._child_env(restarts), self.clock.monotonic(),
                                   self.memory.child_fds() if self.memory is not None else ())
        except OSError as exc:
            self._decide(act.SpawnFailed(str(exc), f"cannot start {self.argv[0]}: {exc.strerror or exc}"))
            return
        self._decide(act.Spawned(pid))

    def _reap(self) -> None:
        for status in self.child.procs.reap():
            life = self.child.is_current(status)
            if life is not None:
                self._child_exited(life, status)

    def _child_exited(self, life: LifeIO, status: ExitStatus) -> None:
        # A trainer's last words (its emergency checkpoint's `saved`) can still sit unread in the socket when
        # its exit is seen; read them, and look at the directory (the watcher may lag), before the outcome is
        # judged and before a restart picks its resume step. Bounded: a flood must not stall the exit.
        # The socket reads come first, so an accept cannot take the spare descriptor (child.bury).
        for _ in range(64):
            if not self._guarded("control I/O", self._poll_io, 0):
                break
        leftovers = self.child.bury(life, self._guarded, self._rescan)
        if self.memory is not None:  # after its leftovers are killed: nothing writes the region any more
            self._guarded("memory tier", self._finish_memory)
        self._guarded("reap", self._reap)
        self._decide(self.child.exit_event(life, status, leftovers))

    def _open_memory(self) -> None:
        try:
            self.memory = MemoryHold.open(self.cfg.key_file, self.cfg.allow_unkeyed)
        except CkptdError as exc:
            self.log("warning", "memory", f"memory tier off: {exc}")

    def _finish_memory(self) -> None:
        """The trainer died: its sealed, uncommitted snapshot becomes its checkpoint before anything else."""
        assert self.memory is not None
        try:
            done = self.memory.finish(self.root)
        except (OSError, CkptdError) as exc:  # a storage error: the run goes on from the disk's newest
            self._event("error", "memory_persist_failed", f"the trainer's uncommitted snapshot could not be written "
                        f"from the memory tier: {exc}", error=str(exc))
            return
        if done.path is not None:
            self._event("info", "memory_persisted", f"step {done.step}: the trainer's snapshot was not committed; "
                        f"written from the memory tier to {done.path}", step=done.step, path=done.path)
            self._rescan()

    def _reload(self) -> None:
        if not self.config_file:
            self.log("info", "reload", "SIGHUP: no --config file to reload")
            return
        try:
            new = configmod.resolve(self.config_file, self.overrides)
        except CkptdError as exc:
            self.log("error", "reload", f"SIGHUP: keeping the current config: {exc}")
            return
        changed = {k: getattr(new, k) for k in RELOADABLE if getattr(new, k) != getattr(self.cfg, k)}
        self.cfg = dataclasses.replace(self.cfg, **changed)
        self.core.reload(self.cfg)
        self._apply_schedules()
        self._event("info", "reload", f"SIGHUP: reloaded {self.config_file}: "
                    + (", ".join(f"{k}={v}" for k, v in changed.items()) or "nothing changed"), changed=changed)

    def _apply_schedules(self) -> None:
        active = self.schedules.apply(self.cfg.every, self.cfg.cron)
        if active:
            self.log("info", "schedule", "checkpoint schedule: " + ", ".join(active.values()))

    # --- cloud preemption notices (supervisor/notices.py) ---------------------------------------

    def _start_notices(self) -> None:
        self.notices, line = noticesmod.start(self.cfg.notices, self.post)
        self.log("info", "notices", line)

    def _slurm_requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            self.log("warning", "slurm", "slurm.requeue is set but SLURM_JOB_ID is not: not running under SLURM, "
                     "nothing requeued")
            return
        argv = ["scontrol", "requeue", job]
        code, output = run_command(argv, timeout=30.0)
        level = "info" if code == 0 else "error"
        self._event(level, "slurm_requeue", f"{' '.join(argv)}: " + ("job requeued" if code == 0 else
                    f"failed ({output or f'exit {code}'}); requeue the job by hand"),
                    job_id=job, exit_code=code, output=output)

    # --- control channel ------------------------------------------------------------------------

    def _on_message(self, peer: Peer, msg: dict[str, Any]) -> None:
        self._decide(act.TrainerMessage(peer, msg) if peer.role == "trainer" else act.ControlRequest(peer, msg))

    def _on_close(self, peer: Peer) -> None:
        if peer.role == "trainer":
            self.log("info", "trainer", f"trainer pid {peer.pid} disconnected")
            self.child.peer_closed(peer)
        self._decide(act.PeerClosed(peer))

    # --- status and shutdown --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        led, life = self.core.led, self.child.life
        trainers = self.control.trainers() if self.control else []
        return {
            "dir": self.root, "run_id": self.run_id, "state": led.sm.state.value,
            "job_id": self.node.job_id, "node_rank": self.node.rank,
            "supervisor_pid": os.getpid(), "child_pid": life.child.pid if life else None,
            "trainers": [{"pid": p.pid, "rank": p.rank} for p in trainers],
            "step": led.step, "last_checkpoint": led.last_checkpoint, "restarts": led.restarts,
            "last_exit": led.last_exit, "started": self.started,
            "uptime": round(self.clock.time() - self.started, 3), "exit_code": self.exit_code,
            "socket": self.control.path if self.control else None, "updated": self.clock.time(),
            "notice": led.notice,
            "metrics": {**self.port.describe(), **self.metrics.status()},
            "remote": {**self.uploads.status(self._local_newest(), self.clock.time()),
                       "held_for_upload": list(self.dir.held)} if self.uploads else None,
            "memory": self.memory.describe() if self.memory is not None else None,
        }

    def _service_view(self) -> ServiceView:
        trainers = self.control.trainers() if self.control else []
        led = self.core.led
        life, stop = led.life, led.stop
        return ServiceView(
            state=led.sm.state.value, step=led.step, last_checkpoint=led.last_checkpoint, restarts=led.restarts,
            quiet_since=min(p.last_seen for p in trainers) if trainers else None,
            stop_reason=stop.reason if stop else None, stop_deadline=life.deadline if life else None,
            hang=bool(life and life.hang), backoff_until=led.backoff_until, exit_code=self.exit_code,
            exit_text=exitcodes.DESCRIPTIONS.get(self.exit_code, "") if self.exit_code is not None else "",
            root=self.root)

    def _save_state(self) -> None:
        status = self.status()
        self.board.publish(status)
        try:
            write_json_atomic(os.path.join(self.run_dir, STATE_NAME), status)
        except OSError as exc:  # a full or failing disk must not stop supervision; status still answers live
            n = self._faults["state.json"] = self._faults.get("state.json", 0) + 1
            reason = exc.strerror or str(exc)
            if n % 100 == 0 or reason != self._state_write_error:  # the first, a new cause, then every 100th
                self._state_write_error = reason
                self.log("warning", "state", f"cannot write {STATE_NAME} ({reason}); "
                         f"`ckptd status` of a stopped run may be stale ({n} failed writes)")

    def _event(self, level: str, event: str, msg: str, *, lines: list[str] | None = None, quiet: bool = False,
               **fields: Any) -> None:
        """Log (unless ``quiet``: routine, the journal is enough), journal and count one event; ``lines``: a
        multi-line block for the text log only."""
        if not quiet:
            self.log(level, event, msg, lines=lines or (), **fields)
        if self.journal is not None:
            self.board.note(self.journal.append(event, run_id=self.run_id, **fields))
        self._metric("on_event", event, fields)

    # --- metrics (supervisor/metrics.py, docs/metrics.md) -------------------------------------------

    def _metric(self, method: str, *args: Any) -> None:
        """Feed the run's metrics; a bug there is logged once and never disturbs supervision."""
        self._guarded("metrics", getattr(self.metrics, method), *args)

    def _publish_metrics(self) -> None:
        led = self.core.led
        self.metrics.publish(state=led.sm.state.value, stopping=led.stop is not None, exit_code=self.exit_code,
                             step=led.step, last_checkpoint=led.last_checkpoint, valid=len(self.view.valid))
        described = self.memory.describe() if self.memory is not None else {}
        self.metrics.memory(described.get("region_bytes", 0), described.get("slot_bytes", 0),
                            described.get("newest_snapshot_step"))
        if self.uploads is not None:
            _, steps, seconds = self.uploads.lag(self._local_newest(), self.clock.time())
            self.metrics.remote_lag(steps, seconds)

    def _local_newest(self) -> tuple[int, float] | None:
        latest = self.view.latest()
        return (latest.step, latest.created) if latest is not None else None

    def _start_metrics(self) -> None:
        if self.cfg.metrics.addr:
            self._publish_metrics()
            self.port.start(self.cfg.metrics, self.run_id)

    def _stop_metrics(self) -> None:
        """After the run: serve the final state for ``metrics.linger`` seconds (a signal ends that), then close.

        The file_sd entry stays until then: Prometheus keeps scraping the target, so it sees how the run ended
        (``stopped``, ``gave_up``: the alerts of docs/metrics.md need that scrape)."""
        server = self.port.server
        if server is None:
            return
        self._publish_metrics()
        linger = self.port.linger_seconds(self.cfg.metrics)
        if linger > 0:
            self.log("info", "metrics", f"serving the final metrics on http://{server.endpoint.addr}/metrics for "
                     f"{linger:g} s more (--metrics-linger), then exiting with {self.exit_code}; SIGTERM or "
                     "Ctrl-C ends the wait")
        end = self.clock.monotonic() + linger
        while self.clock.monotonic() < end and not self._signalled_during_linger():
            self._poll_io(min(1.0, max(0.0, end - self.clock.monotonic())))
        self.port.close()

    def _wait_upload(self) -> None:
        """``stop_upload: wait``: after a stop, exit only once the newest local checkpoint (the emergency one) is on
        the remote tier, or the stop's deadline has passed (said), or a second SIGTERM/SIGINT ends the wait. The
        child is gone: nothing else is left to do, and the clients of `ckptd stop` hear the outcome after it."""
        stop = self.core.led.stop
        if self.uploads is None or stop is None:
            return
        t0 = self.clock.monotonic()
        left = stop.deadline - t0
        url = self.uploads.spec.url
        if self.cfg.stop_upload != "wait":
            if stop.notice is None or stop.notice.deadline is None:
                return  # a stop without a platform deadline: the run exits once the checkpoint is local
            d = self.uploads.decide_emergency(left)
            self._event("info" if d.attempt else "warning", "emergency_upload",
                        f"stop before the notice's deadline: {'uploading' if d.attempt else 'not uploading'} "
                        f"{d.checkpoint or 'the emergency checkpoint'} to the remote tier {url}: {d.reason}",
                        url=url, **dataclasses.asdict(d))
            self._save_state()
            if not d.attempt:
                return
        ok, name, step = self.uploads.wait_stopped(left, self._signalled_during_linger)
        waited = round(self.clock.monotonic() - t0, 3)
        if not name:
            self._event("warning", "remote_wait", f"stop: no valid local checkpoint to put on the remote tier {url}",
                        uploaded=False, url=url, seconds=waited)
        elif ok:
            self._event("info", "remote_wait", f"stop: {name} is on the remote tier {url} (waited {waited:g} s)",
                        uploaded=True, checkpoint=name, step=step, url=url, seconds=waited)
        else:
            why = "the stop's deadline ran out" if self.clock.monotonic() - t0 >= left else "a second signal ended it"
            self._event("warning", "remote_wait", f"stop: {why} after {waited:g} s before {name} reached the remote "
                        f"tier {url}: it is on the local tier only (an upload cut short leaves nothing visible "
                        "there)", uploaded=False, checkpoint=name, step=step, url=url, seconds=waited,
                        reason="deadline" if why.startswith("the stop") else "signal")

    def _signalled_during_linger(self) -> bool:
        while True:
            try:
                event = self.queue.get_nowait()
            except queue.Empty:
                return False
            if event[0] == "signal" and event[1] in (signal.SIGTERM, signal.SIGINT):
                return True

    def _finish(self) -> None:
        self.child.kill_all()  # an exception escaped the loop: leave nothing running
        self.schedules.shutdown()
        # The upload a stop may still make reads the time left before the deadline: nothing that can take seconds
        # (the notice pollers' joins) goes before it.
        if self.uploads is not None:
            self._guarded("remote tier", self._wait_upload)
            self.uploads.close()
        if self.notices is not None:
            self.notices.close()  # sends the acknowledgements asked for, bounded
        self.watcher.stop()
        if self.control is not None:
            for action in self.core.finish(self.port.linger_seconds(self.cfg.metrics)):
                self._do(action)
            self.control.flush(self.clock.monotonic() + 2.0)
            self.control.close()
        if self.exit_code is None:
            self._exit_fallback = exitcodes.FAILURE
        code = self.exit_code if self.exit_code is not None else exitcodes.FAILURE
        self._metric("training_ended")
        self.service.exited(code, exitcodes.DESCRIPTIONS.get(code, "the child's exit code"))
        self.notifier.close()
        self._save_state()
        self._guarded("metrics endpoint", self._stop_metrics)
        if self.journal is not None:
            self.journal.close()
        self.child.procs.shutdown()
        self.spare.close()
        if self.memory is not None:
            self.memory.close()  # the region's memory goes with its last descriptor


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _slurm_env() -> dict[str, Any]:
    """SLURM's view of this job for the journal's `start` event (requeued jobs count their restarts)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return {"slurm": {"job_id": os.environ["SLURM_JOB_ID"],
                      "restart_count": int(count) if count.isdigit() else 0}}
