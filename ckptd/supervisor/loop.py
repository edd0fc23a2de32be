"""The Supervisor: one loop that owns the child.

Signal handlers, the scheduler thread, the file-watcher thread and the cloud-notice poller only put
events on a queue (``queue.SimpleQueue``, safe to use from a signal handler) and wake the selector; the
loop in the main thread does all the work: control-socket I/O, state transitions, spawning, stopping,
restarts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import selectors
import signal
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from .. import env as envvars
from .. import exitcodes, origin, protocol, store
from ..errors import CkptdError
from . import config as configmod
from . import metrics as metricsmod
from . import notices as noticesmod
from . import resume
from .clock import Clock
from .config import Config
from .control import ControlServer, Peer
from .journal import JOURNAL_NAME, STATE_NAME, Journal, read_json, write_json_atomic
from .log import EventLog, redact_argv
from .notify import CHILD_UNSET, Notifier
from .policy import ExitStatus, Outcome, Reason, RestartPolicy, classify
from .process import Child, Processes, oom_kill_count, process_state, run_command, system_oom_kill_count
from .reserve import SpareFd
from .rundir import JobLock, choose_socket_path, node_identity, node_run_dir
from .schedule import Schedules
from .service import Service, ServiceView
from .states import ChildState, StateMachine
from .watch import CheckpointView, DirWatcher

S = ChildState
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
RELOADABLE = ("every", "cron", "keep_last", "keep_every", "keep_best", "hang_timeout", "grace", "force_grace")
FS_DEBOUNCE = 0.2  # seconds: one rescan per burst of file events
IDLE_WAKE = 60.0  # the loop sleeps at most this long when nothing is due
STACK_WAIT = 1.0  # seconds between asking hung trainers for their stacks and reading them
STDERR_TAIL = 20  # lines of the child's stderr kept to show when the run gives up
STARTUP_WINDOW = 30.0  # a script that never connects and dies within this counts as failing to start
MAX_PRUNING = 1024  # names the trainers' retention announced and the directory still shows (bounded)


@dataclass
class StopRequest:
    request_id: str
    reason: str
    deadline: float  # monotonic
    deadline_wall: float
    waiters: list[Peer] = field(default_factory=list)
    confirmed: bool = False  # a trainer reported its emergency checkpoint committed
    notice: noticesmod.Notice | None = None  # the cloud notice that asked for this stop
    signalled: bool = False  # a SIGTERM/SIGINT arrived after that notice (the same preemption)
    committed_at: float | None = None  # unix time the emergency checkpoint was reported committed
    committed_step: int | None = None
    no_checkpoint: str | None = None  # why the trainer did not write one (it says so in `stopping`)
    acked: set[str] = field(default_factory=set)  # Azure events acknowledged
    requested_at: float = 0.0  # unix time of the request
    joined: bool = False  # not asked of this supervisor: the job stopped elsewhere (another node, a rank's signal)


@dataclass
class Life:
    """What the loop knows about the current child process."""

    child: Child
    oom_before: int
    system_oom_before: int = 0
    last_step: int | None = None
    stepped: bool = False  # a trainer reported a completed step (heartbeat, saved) in this life
    connected: bool = False  # a trainer of this life spoke the control protocol
    hang: bool = False  # we are killing it because it stopped sending heartbeats
    stopped_with_checkpoint: bool = False  # a trainer said `stopping` with exit code 85 (its checkpoint committed)
    we_killed: bool = False  # we sent SIGKILL (so a SIGKILL death is not an OOM)
    deadline: float | None = None  # STOPPING: when to SIGKILL
    stacks_due: float | None = None  # hang: when to read the stack dumps we asked for
    hung: list[Peer] = field(default_factory=list)  # the silent trainers of a hang
    dumped: list[Peer] = field(default_factory=list)  # every trainer of a hang: their stacks are read
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    stderr_partial: bytes = b""
    stderr_fd: int | None = None


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], *, config_file: str | None = None,
                 overrides: dict[str, Any] | None = None, clock: Clock | None = None,
                 log: EventLog | None = None, command: list[str] | None = None, fresh: bool = False,
                 resume_from: str | None = None) -> None:
        self.cfg = configmod.absolute(cfg)
        self.argv = argv
        self.command = list(command) if command is not None else list(argv)  # as the user typed it (origin.py)
        self.fresh, self.resume_from = fresh, resume_from
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
        self.sm = StateMachine()
        self.procs = Processes()
        self.spare = SpareFd()  # released around the child-exit work, so EMFILE cannot stop it (reserve.py)
        self.policy = RestartPolicy(max_restarts=cfg.max_restarts, window=cfg.restart_window,
                                    base=cfg.backoff_base, cap=cfg.backoff_max, same_step_limit=cfg.same_step_crashes,
                                    start_failure_limit=cfg.start_failures)
        self.notifier = Notifier.from_env()
        self.service = Service(self.notifier)  # what systemd hears: docs/systemd.md
        self.schedules = Schedules(self.post)
        self.watcher = DirWatcher(self.root, self.post)
        self.view = CheckpointView(self.root)
        self.life: Life | None = None
        self.stop: StopRequest | None = None
        self.saves: dict[str, list[Peer]] = {}
        self.restarts = 0
        self.exit_code: int | None = None
        self.run_id = ""
        self.started = self.clock.time()
        self.step: int | None = None
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_exit: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # set between a crash and the restart it leads to
        self._expected_resume: int | None = None  # the step a restarted life should resume at (newest checkpoint)
        self._restore_reported = False  # a trainer of the current (or last) life reported its restore: `resumed`
        self._backoff_until: float | None = None
        self._fs_due: float | None = None
        self._journaled: set[str] = set()  # checkpoint names already in the journal
        self._retired: set[str] = set()  # names our retention deleted
        self._pruning: dict[str, None] = {}  # names a trainer's retention announced it deletes (insertion order)
        self._resumed_from: str | None = None  # pinned: retention never deletes the checkpoint a run resumed from
        self._person_saves: set[str] = set()  # ids of saves a person asked for (ckptd save, SIGUSR1): pinned
        self._wake_w = -1
        self._trainer_seen = False  # some life of this run connected: restarts resume from checkpoints
        self._faults: dict[str, int] = {}  # where the loop caught an unexpected error, how often
        self._fault_reason: dict[str, str] = {}  # the last cause logged for each
        self.journal: Journal | None = None
        self.control: ControlServer | None = None
        self.notices: noticesmod.Poller | None = None
        self.notice: dict[str, Any] | None = None  # the last cloud notice acted on (`ckptd status`)
        self._notice_saves: dict[str, str] = {}  # save request id -> Azure event to acknowledge after it
        self._pending_acks: list[str] = []  # Azure events that arrived during a stop already under way
        self.metrics = metricsmod.RunMetrics(self._new_registry(), self.clock, latest_step=self._latest_step)
        self.metrics_server: metricsmod.MetricsServer | None = None
        self._sd_file: str | None = None

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
        self.procs.setup()
        previous = read_json(os.path.join(self.run_dir, STATE_NAME)) or {}
        # A run that did not finish (preempted, gave up, supervisor killed) keeps its id when resumed.
        self.run_id = previous.get("run_id") if previous.get("exit_code") != 0 and previous.get("run_id") and \
            (self.start_plan is None or self.start_plan.action is not resume.Action.FRESH) else uuid.uuid4().hex[:12]
        if self.run_id == previous.get("run_id"):  # goodput counts the whole run, across `ckptd run`s
            self.metrics.goodput.resume((previous.get("metrics") or {}).get("goodput"))
        self.journal = Journal(os.path.join(self.run_dir, JOURNAL_NAME), self.clock.time, on_error=self.log)
        self.control = ControlServer(choose_socket_path(self.run_dir), self.sel, self.clock, self._on_message,
                                     self._on_close, self.log)
        self.control.open()
        try:
            self._guarded("trash cleanup", self._remove_stale_trash)
            self.view.refresh()
            self._journaled.update(self.view.valid)
            latest = self.view.latest()
            if latest is not None:
                self.last_checkpoint = _ckpt_record(latest.name, latest.step, latest.kind, latest.created)
            self.watcher.start()
            self._apply_schedules()
            self._guarded("notices", self._start_notices)
            self._guarded("metrics endpoint", self._start_metrics)
            node = f", {self.node.describe()}" if self.node.job_id is not None else ""
            argv = redact_argv(self.argv)  # secrets on the command line stay out of the log and the journal
            self._event("info", "start", f"supervising {' '.join(argv)} in {self.root} (run {self.run_id}{node})",
                        pid=os.getpid(), argv=argv, dir=self.root, job_id=self.node.job_id,
                        node_rank=self.node.rank,
                        resume_from=latest.step if latest else None, config=self.cfg.as_dict(),
                        metrics=self._metrics_endpoint(), **_slurm_env())
            self._spawn()
            self.service.ready(self._service_view(), self.clock.monotonic(), self.clock.time())
            while not self.sm.terminal:
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
                         f"supervision continues ({n} so far)", lines=traceback.format_exc(limit=8).rstrip().splitlines())
            return None

    def _poll_io(self, timeout: float) -> int:
        ready = self.sel.select(timeout)
        for key, mask in ready:
            self._guarded("control I/O", key.data, mask)
        return len(ready)

    def _timeout(self) -> float:
        now = self.clock.monotonic()
        life = self.life
        due = [t for t in (self._fs_due, self._backoff_until, self.service.next_due(),
                           life.deadline if life else None, life.stacks_due if life else None,
                           self._hang_due(), self.control.next_due() if self.control else None) if t is not None]
        return max(0.0, min([IDLE_WAKE + now, *due]) - now)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "signal":
            self._on_signal_event(event[1])
        elif kind == "schedule":
            self._request_save(f"schedule ({event[1]})", kind="manual")
        elif kind == "fs":
            if self._fs_due is None:
                self._fs_due = self.clock.monotonic() + FS_DEBOUNCE
        elif kind == "notice":
            self._on_notice(event[1])
        elif kind == "notice_log":
            self.log(event[1], "notices", event[2])

    def _on_signal_event(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGCHLD:
            self._reap()
            return
        if self.journal is not None:
            self.journal.append("notice", run_id=self.run_id, signal=name, state=self.sm.state.value)
        if signum == configmod.signal_number(self.cfg.requeue_signal):
            self._metric("signal_notice", "requeue")
            self._request_stop(f"{name} (requeue)")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._metric("signal_notice", "signal")
            self._request_stop(name, force=self._second_stop(name))
        elif signum == signal.SIGUSR1:
            self._person_saves.add(self._request_save(name) or "")
        elif signum == signal.SIGHUP:
            self._reload()

    def _run_timers(self) -> None:
        now = self.clock.monotonic()
        if self.control is not None:
            self.control.expire()
        if self.life is not None and self.life.stacks_due is not None and now >= self.life.stacks_due:
            self._collect_stacks(self.life)
        if self._fs_due is not None and now >= self._fs_due:
            self._fs_due = None
            self.watcher.rescan_started()
            # A trainer announces its retention's deletions (`pruning`) before it deletes, so the message is in
            # the socket before the file event that follows it: read what is there, then judge the removals.
            self._poll_io(0)
            self._rescan()
        life = self.life
        if self.sm.state is S.STOPPING and life and life.deadline is not None and now >= life.deadline:
            self._kill(life, "the hang grace ran out" if life.hang else "the grace period ran out")
        if self.sm.state is S.BACKOFF and self._backoff_until is not None and now >= self._backoff_until:
            self._backoff_until = None
            self._spawn()
        hang_due = self._hang_due()
        if hang_due is not None and now >= hang_due and self.life is not None:
            self._hang(self.life)
        self.service.tick(self._service_view(), self.clock.monotonic(), self.clock.time())

    def _hang_due(self) -> float | None:
        if self.sm.state is not S.RUNNING or not self.cfg.hang_timeout or self.control is None:
            return None
        trainers = self.control.trainers()
        return min(p.last_seen for p in trainers) + self.cfg.hang_timeout if trainers else None

    # --- the child ------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CHILD_UNSET}
        env.update({
            envvars.DIR: self.root,
            envvars.RUN_ID: self.run_id,
            envvars.RESTART_COUNT: str(self.restarts),
            envvars.CONTROL: self.control.path if self.control else "",
            envvars.STOP_DEADLINE: "",
            envvars.EXIT_ON_STOP: str(exitcodes.PREEMPTED),
            envvars.METRICS: "1" if self.cfg.metrics.addr else "0",
            envvars.ORIGIN: origin.for_env(self.command, self._origin_config(), self.resume_from),
            envvars.RESUME_FROM: self.resume_from or "",
            envvars.RETENTION: "1" if self.cfg.retention_enabled else "",
        })
        if self.cfg.every_steps:
            env[envvars.EVERY_STEPS] = str(self.cfg.every_steps)
        if self.cfg.keep_last:
            env[envvars.KEEP_LAST] = str(self.cfg.keep_last)
        return env

    def _spawn(self) -> None:
        now = self.clock.monotonic()
        oom_before, system_oom_before = oom_kill_count(), system_oom_kill_count()
        try:
            child = self.procs.spawn(self.argv, self._child_env(), now)
        except OSError as exc:
            self._event("error", "spawn_failed", f"cannot start {self.argv[0]}: {exc.strerror or exc}",
                        error=str(exc))
            self._after_failure(None, Reason.ERROR.value, before_first_step=True)
            return
        self.life = Life(child, oom_before, system_oom_before, stderr_fd=child.stderr)
        self._restore_reported = False
        if child.stderr is not None:
            self.sel.register(child.stderr, selectors.EVENT_READ, lambda mask, life=self.life: self._child_stderr(life))
        self.sm.to(S.RUNNING)
        if self._resume is not None:
            self._event("info", "restart", f"restart #{self.restarts} (pid {child.pid}) after {self._resume['reason']}; "
                        + _resume_text(self._resume), restart_count=self.restarts, pid=child.pid, **self._resume)
            self._expected_resume, self._resume = self._resume["resume_step"], None
        else:
            self._event("info", "spawn", f"started pid {child.pid}", pid=child.pid, restart_count=self.restarts)
        self._save_state()

    def _child_stderr(self, life: Life, final: bool = False) -> None:
        """Pass the child's stderr through to ours, keeping its last lines for a give-up message.

        ``final``: the child is gone and its leftovers killed; read what is there and close the pipe.
        """
        fd = life.stderr_fd
        if fd is None:
            return
        while True:
            try:
                data: bytes | None = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if not data:
                break
            try:
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()
            except (OSError, ValueError, AttributeError):
                pass  # our stderr is gone; the tail is still kept
            *lines, partial = (life.stderr_partial + data).split(b"\n")
            life.stderr_tail.extend(line[-1000:] for line in lines)
            life.stderr_partial = partial[-1000:]
        if data == b"" or final:  # EOF: every writer is gone
            if life.stderr_partial:
                life.stderr_tail.append(life.stderr_partial)
                life.stderr_partial = b""
            self.sel.unregister(fd)
            os.close(fd)
            life.stderr_fd = None

    def _reap(self) -> None:
        for status in self.procs.reap():
            life = self.life
            if life is not None and status.pid == life.child.pid:
                self._child_exited(life, status)

    def _child_exited(self, life: Life, status: ExitStatus) -> None:
        # A trainer's last words (its emergency checkpoint's `saved`) can still sit unread in the socket when
        # its exit is seen; read them, and look at the directory (the watcher may lag), before the outcome is
        # judged and before a restart picks its resume step. Bounded: a flood must not stall the exit.
        # Every step is guarded, and what needs descriptors runs with the spare one free (after the socket
        # reads, so an accept cannot take it): out of descriptors (EMFILE) or memory, the exit is still
        # judged and the run goes on or ends; it never stays half-handled.
        for _ in range(64):
            if not self._guarded("control I/O", self._poll_io, 0):
                break
        with self.spare.released():
            self._guarded("rescan", self._rescan)
            if life.stacks_due is not None:
                self._guarded("stacks", self._collect_stacks, life)
            self.life = None
            leftovers = self._guarded("leftover kill", self.procs.kill_all, life.child) or 0
        self.procs.forget(life.child)
        self._guarded("child stderr", self._child_stderr, life, True)
        self._guarded("reap", self._reap)
        outcome = classify(status, stop_requested=self.stop is not None, hang=life.hang, we_killed=life.we_killed,
                           oom_kills=oom_kill_count() - life.oom_before,
                           system_oom_kills=system_oom_kill_count() - life.system_oom_before,
                           no_restart=frozenset(self.cfg.no_restart_exit_codes))
        if status.code == 0 and self.stop is not None and life.stopped_with_checkpoint:
            # torchrun under `ckptd run`: the ranks exit 0 after the emergency checkpoint (distributed.py,
            # clean_stop_exit_code) so that torchrun ends quietly; this is the stop, not the end of training.
            outcome = Outcome(Reason.PREEMPTED, f"{status.describe()}: its ranks stopped after the emergency "
                                                "checkpoint")
        for request_id in list(self.saves):  # nobody is left to answer them
            for waiter in self.saves.pop(request_id):
                self._reply_and_close(waiter, protocol.SAVE_FAILED, request_id=request_id,
                                      error=f"the trainer exited ({status.describe()}) before committing the checkpoint")
        uptime = self.clock.monotonic() - life.child.started
        self.last_exit = {"pid": status.pid, "code": status.code, "signal": status.signal,
                          "reason": outcome.reason.value, "detail": outcome.detail, "step": life.last_step,
                          "time": self.clock.time()}
        level = "info" if outcome.reason in (Reason.FINISHED, Reason.PREEMPTED) else "warning"
        self._event(level, "exit", f"pid {status.pid} {outcome.detail} at step {_fmt(life.last_step)} "
                    f"after {uptime:.1f} s" + (f"; killed {leftovers} leftover process(es)" if leftovers else ""),
                    uptime=round(uptime, 3), leftovers_killed=leftovers, **self.last_exit)
        if outcome.reason is Reason.FINISHED:
            self._end(S.EXITED, exitcodes.OK, "training finished")
        elif self.stop is not None:
            # Judged by the checkpoint, not only by the exit code: torchrun exits 1 when its ranks exit 85 or 86
            # (outside `ckptd run`, or a rank whose stop went wrong).
            confirmed = outcome.reason is Reason.PREEMPTED or self.stop.confirmed
            self._end(S.EXITED, exitcodes.PREEMPTED if confirmed else exitcodes.STOPPED_NO_CHECKPOINT,
                      "stopped with an emergency checkpoint" if confirmed else self._why_no_checkpoint(life, status))
        elif outcome.reason is Reason.PREEMPTED:
            self._end(S.EXITED, exitcodes.PREEMPTED, "the trainer was stopped from outside (SIGTERM) "
                                                     "and committed an emergency checkpoint")
        elif outcome.reason is Reason.NO_RESTART:
            self._end(S.EXITED, status.code or exitcodes.FAILURE, f"not restarting: {outcome.detail}")
        else:
            # Failing to start: no step in this life (a script using the library never reached ck.step();
            # one that never connected died within STARTUP_WINDOW). docs/supervisor.md, "Restarts".
            early = not life.stepped and (life.connected or uptime < STARTUP_WINDOW)
            self._after_failure(life.last_step, outcome.reason.value, before_first_step=early,
                                tail=list(life.stderr_tail))

    def _emergency_committed(self, step: Any, at: float) -> None:
        """The stop's emergency checkpoint is durable: reported by a trainer, or seen on disk by a rescan
        (a launcher's exit code can hide the ranks' 85, and a trainer may die before it reports)."""
        stop = self.stop
        if stop is None:
            return
        stop.confirmed = True
        if stop.committed_at is None:
            stop.committed_at, stop.committed_step = at, step
        self._acknowledge_notices()  # the checkpoint is durable: the platform may go ahead

    def _why_no_checkpoint(self, life: Life, status: ExitStatus) -> str:
        if self.stop is not None and self.stop.no_checkpoint:
            return f"stopped without an emergency checkpoint: {self.stop.no_checkpoint}"
        if not life.connected:
            return ("stopped; no emergency checkpoint: the script never connected to ckptd "
                    "(it does not use ckptd.Checkpointer, or it had not created one yet)")
        if not life.stepped:
            return "stopped before the trainer reached its first step; there was nothing to checkpoint"
        if life.we_killed:
            return f"stopped; the grace period ({self.cfg.grace:g} s) ran out before an emergency checkpoint " \
                   "was confirmed"
        return f"stopped; the trainer ended ({status.describe()}) without confirming an emergency checkpoint"

    def _after_failure(self, step: int | None, reason: str, *, before_first_step: bool = False,
                       tail: list[bytes] | None = None) -> None:
        decision = self.policy.on_failure(self.clock.monotonic(), step, before_first_step=before_first_step)
        if not decision.restart:
            lines = [t.decode("utf-8", "replace") for t in tail or [] if t.strip()]
            shown = "; the script's last stderr lines:" if lines else ""
            self._event("error", "give_up", f"giving up: {decision.why}{shown}", lines=lines, why=decision.why,
                        restarts=self.restarts, stderr_tail=lines)
            self._end(S.FATAL, exitcodes.GAVE_UP, "gave up")
            return
        if not self._trainer_seen and self.restarts == 0:
            self.log("warning", "restart", "the script never connected to the supervisor (it does not use "
                     "ckptd.Checkpointer): every restart begins from scratch, not from a checkpoint")
        latest = self.view.latest()  # current: _child_exited rescanned the directory
        resume = latest.step if latest is not None else None
        lost = max(0, step - resume) if step is not None and resume is not None else step
        self._resume = {"reason": reason, "crash_step": step, "resume_step": resume, "lost_steps": lost,
                        "delay": round(decision.delay, 3)}
        self.restarts += 1
        self._backoff_until = self.clock.monotonic() + decision.delay
        self.sm.to(S.BACKOFF)
        self._event("info", "backoff", f"restarting in {decision.delay:.2f} s "
                    f"({self.policy.restarts_in_window}/{self.cfg.max_restarts} restarts in the window)",
                    delay=round(decision.delay, 3), restart_count=self.restarts)
        self._save_state()

    def _hang(self, life: Life) -> None:
        """A trainer went silent: dump its stacks, SIGTERM, and SIGKILL after the short hang grace.

        A hung trainer cannot write a checkpoint, so it does not get the preemption grace.
        """
        now = self.clock.monotonic()
        trainers = self.control.trainers()  # type: ignore[union-attr]
        silent = now - min(p.last_seen for p in trainers)
        life.hung = [p for p in trainers if now - p.last_seen >= self.cfg.hang_timeout] or trainers
        # Every rank's stacks, not only the silent one's: its peers blocked in a collective show where the job
        # stands, and a rank that cannot dump (SIGSTOPped, stuck in the kernel) leaves only theirs.
        life.dumped = list(trainers)
        asked = [p for p in life.dumped if p.stack_signal and self._stack_path(p)
                 and self.procs.signal_pid(p.pid or 0, p.stack_signal)]
        self._event("warning", "hang", f"no heartbeat for {silent:.1f} s (hang_timeout {self.cfg.hang_timeout:g} s) "
                    f"from pid {', '.join(str(p.pid) for p in life.hung)}; "
                    + (f"dumping {len(asked)} stack(s), " if asked else "")
                    + f"SIGTERM to pid {life.child.pid}, SIGKILL in {self.cfg.hang_grace:g} s",
                    step=life.last_step, silent=round(silent, 3), pids=[p.pid for p in life.hung])
        life.hang = True
        life.stacks_due = now + min(STACK_WAIT, self.cfg.hang_grace / 2) if asked else None
        life.deadline = now + self.cfg.hang_grace
        self.procs.signal_main(life.child, signal.SIGTERM)
        self.sm.to(S.STOPPING)

    def _stack_path(self, peer: Peer) -> str | None:
        """The stack file a trainer announced, only if it is where ours are (the run's private directory)."""
        if not self.control or not peer.stack_file or not peer.pid:
            return None
        expected = os.path.join(os.path.dirname(self.control.path), f"stacks-{peer.pid}.txt")
        return expected if peer.stack_file == expected else None

    def _collect_stacks(self, life: Life) -> None:
        """Read the stack dumps of a hang into the log and the journal."""
        life.stacks_due = None
        for peer in life.dumped or life.hung:
            path = self._stack_path(peer)
            text = ""
            if path:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        text = f.read(256 << 10).decode("utf-8", "replace").strip()
                except OSError:
                    pass
                with contextlib.suppress(OSError):
                    store.unlink_at(path, check=store.private_dir)
            if not text:
                state = process_state(peer.pid or 0)
                text = ("no stack dump: the process is stopped (SIGSTOP or a debugger)" if state in ("T", "t") else
                        "no stack dump: the process did not run its handler (stuck in the kernel, state "
                        f"{state or 'gone'})" if peer.stack_signal else
                        "no stack dump: the trainer did not arm one")
            silent = peer in life.hung
            self._event("warning", "hang_stacks", f"stacks of {'hung' if silent else 'waiting'} pid {peer.pid} "
                        f"(rank {_fmt(peer.rank)}{'' if silent else ', not silent'}):", lines=text.splitlines(),
                        pid=peer.pid, rank=peer.rank, silent=silent, stacks=text)

    def _kill(self, life: Life, why: str) -> None:
        if life.stacks_due is not None:
            self._collect_stacks(life)
        life.we_killed = True
        life.deadline = None
        with self.spare.released():
            killed = self.procs.kill_all(life.child)
        self.sm.to(S.KILLING)
        self._event("warning", "kill", f"{why}: SIGKILL to the process group of pid {life.child.pid}",
                    pid=life.child.pid, killed=killed)

    def _end(self, state: ChildState, code: int, why: str) -> None:
        self.exit_code = code
        self.sm.to(state)
        self._metric("training_ended")
        if self.stop is not None:
            self._guarded("after the stop", self._after_stop, code)
        self._event("info" if code in (0, exitcodes.PREEMPTED) else "warning", "end",
                    f"{why}; exiting with {code} ({exitcodes.DESCRIPTIONS.get(code, 'child exit code')})",
                    exit_code=code, restarts=self.restarts)

    # --- requests -------------------------------------------------------------------------------

    def _request_stop(self, reason: str, *, force: bool = False, waiter: Peer | None = None,
                      notice: noticesmod.Notice | None = None) -> str:
        if self.stop is None:
            grace = self.cfg.grace
            if notice is not None and notice.deadline is not None:  # the platform's deadline replaces the grace
                grace = max(1.0, notice.deadline - self.clock.time())
            self._new_stop(reason, grace, notice.deadline if notice else None, notice=notice)
            self._begin_stop()
        elif force and self.life is not None:
            self._force_stop(self.life, reason)
        elif force and self.sm.state in (S.STOPPING, S.KILLING):  # no child left, yet not ended: end now
            self._end(S.EXITED, exitcodes.PREEMPTED if self.stop.confirmed else exitcodes.STOPPED_NO_CHECKPOINT,
                      f"second {reason} with no child left")
        if waiter is not None:
            waiter.waiting = True
            self.stop.waiters.append(waiter)
        return self.stop.request_id

    def _new_stop(self, reason: str, grace: float, deadline_wall: float | None = None, **kw: Any) -> None:
        """Record a stop whose deadline is ``grace`` seconds away (a notice's own deadline when it has one)."""
        now, wall = self.clock.monotonic(), self.clock.time()
        self.stop = StopRequest(uuid.uuid4().hex[:12], reason, now + grace,
                                deadline_wall if deadline_wall is not None else wall + grace, requested_at=wall, **kw)
        self._metric("stop_requested", self.stop.deadline_wall)
        self.service.stopping(reason)

    def _begin_stop(self) -> None:
        stop, life = self.stop, self.life
        assert stop is not None
        if self.sm.state in (S.IDLE, S.BACKOFF):
            self._backoff_until = None
            self._event("info", "stop_requested", f"stop requested ({stop.reason}) while no trainer runs",
                        reason=stop.reason)
            self._end(S.EXITED, exitcodes.STOPPED_NO_CHECKPOINT, "stopped between restarts")
            return
        if life is None:
            return
        trainers = self.control.trainers() if self.control else []
        if self.sm.state is S.RUNNING:
            if trainers:
                for peer in trainers:
                    self.control.send(peer, protocol.STOP, request_id=stop.request_id,  # type: ignore[union-attr]
                                      deadline=stop.deadline_wall, reason=stop.reason)
            else:
                self.procs.signal_main(life.child, signal.SIGTERM)
            life.deadline = stop.deadline
            self.sm.to(S.STOPPING)
        via = "control channel" if trainers else "SIGTERM"
        grace = round(stop.deadline - self.clock.monotonic(), 3) if stop.notice else self.cfg.grace
        self._event("info", "stop_requested", f"stop requested ({stop.reason}): asked the trainer via {via}; "
                    + (f"deadline in {grace:.1f} s" if stop.notice else f"grace {grace:g} s"),
                    reason=stop.reason, via=via, grace=grace, deadline=stop.deadline_wall)
        self._save_state()

    def _join_stop(self, peer: Peer, msg: dict[str, Any]) -> None:
        """A trainer stops though nobody asked this supervisor: the job's stop came from elsewhere (another
        node's supervisor, whose ranks agreed on it with ours in ``ck.step()``, or a signal to a rank). Judge
        the exit like a stop of our own: exit 85 when the emergency checkpoint it reports is on disk."""
        from .. import store

        step, code = msg.get("step"), msg.get("exit_code")
        self._new_stop("the job stopped elsewhere", self.cfg.grace, joined=True)
        assert self.stop is not None
        if self.life is not None:
            self.life.deadline = self.stop.deadline
        self.sm.to(S.STOPPING)
        self._event("info", "stop_requested", f"trainer pid {peer.pid} (rank {_fmt(peer.rank)}) stops at step "
                    f"{_fmt(step)} with exit code {_fmt(code)} without a stop asked of this supervisor: the job "
                    f"stopped elsewhere; waiting {self.cfg.grace:g} s for it to exit", reason=self.stop.reason,
                    via="trainer", grace=self.cfg.grace, step=step, rank=peer.rank)
        self._rescan()
        info = self.view.valid.get(store.checkpoint_name(step)) if isinstance(step, int) and step >= 0 else None
        if code == exitcodes.PREEMPTED and info is not None and info.kind == "emergency":
            self._emergency_committed(step, info.created)
        self._save_state()

    def _force_stop(self, life: Life, reason: str) -> None:
        if self.sm.state is not S.STOPPING:
            return
        self.procs.signal_main(life.child, signal.SIGTERM)
        deadline = self.clock.monotonic() + self.cfg.force_grace
        life.deadline = min(life.deadline or deadline, deadline)
        self._event("warning", "stop_forced", f"second {reason}: SIGTERM to pid {life.child.pid}, "
                    f"SIGKILL in {self.cfg.force_grace:g} s", reason=reason)

    def _request_save(self, source: str, *, kind: str = "manual", waiter: Peer | None = None,
                      hurry: bool = False) -> str | None:
        trainers = self.control.trainers() if self.control and self.sm.state is S.RUNNING else []
        if not trainers:
            why = {S.STOPPING: "the trainer is stopping", S.KILLING: "the trainer is being killed",
                   S.BACKOFF: "the trainer is between restarts"}.get(self.sm.state)
            if why is None and self.sm.state is S.RUNNING and self.life is not None and self._trainer_seen:
                # A trainer of this run spoke before: this life's will connect once its script creates the
                # Checkpointer (after a restart, imports and data loading take a while).
                why = ("the trainer is exiting (it disconnected)" if self.life.connected else
                       f"the trainer is starting (pid {self.life.child.pid} has not connected yet)")
            self.log("info" if why else "warning", "save_skipped", f"checkpoint request from {source} skipped: "
                     + (why or "no trainer is connected (the script does not use ckptd.Checkpointer, or has not "
                                "created one yet)"))
            return None
        request_id = uuid.uuid4().hex[:12]
        for peer in trainers:
            self.control.send(peer, protocol.SAVE, request_id=request_id, kind=kind,  # type: ignore[union-attr]
                              wait=waiter is not None or hurry)
        self.saves[request_id] = [waiter] if waiter else []
        self._metric("save_requested", request_id)
        if waiter is not None:
            waiter.waiting = True
        self.log("info", "save_requested", f"checkpoint requested by {source} (request {request_id})")
        return request_id

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

    def _on_notice(self, notice: noticesmod.Notice) -> None:
        fields = notice.fields()
        if notice.withdrawn:
            self._event("info", "notice_withdrawn", f"{notice.source}: {notice.detail}; training goes on", **fields)
            return
        lead = f", deadline in {notice.deadline - self.clock.time():.1f} s" if notice.deadline is not None else ""
        todo = {"stop": "emergency checkpoint, then stop", "checkpoint": "checkpoint and keep training",
                "log": "nothing to do"}[notice.action]
        self._event("warning" if notice.action != "log" else "info", "notice",
                    f"{notice.source} {notice.kind} notice: {notice.detail}{lead}; {todo}",
                    state=self.sm.state.value, **fields)
        if notice.action == "stop":
            if self.stop is not None:  # a second notice, or a notice after SIGTERM: one emergency checkpoint
                self.log("info", "notices", f"a stop is already under way ({self.stop.reason}): "
                         "one emergency checkpoint, not two")
                if notice.event_id and (self.stop.committed_at is not None or self.sm.terminal):
                    self._acknowledge_notices(notice.event_id)
                elif notice.event_id:
                    self._pending_acks.append(notice.event_id)
                return
            self.notice = {**fields, "pending": True}
            self._request_stop(f"{notice.source} {notice.kind} notice", notice=notice)
            self._save_state()
        elif notice.action == "checkpoint":
            self.notice = {**fields, "pending": True}
            request_id = self._request_save(f"the {notice.source} {notice.kind} notice", hurry=True)
            if request_id is None:
                self._acknowledge_notices(notice.event_id)
            elif notice.event_id:
                self._notice_saves[request_id] = notice.event_id
            self._save_state()

    def _second_stop(self, name: str) -> bool:
        """A second stop takes the fast path, except the platform's SIGTERM after its own notice: that is
        the same preemption, and the emergency checkpoint already under way keeps the notice's deadline."""
        stop = self.stop
        if stop is None:
            return False
        if stop.notice is not None and not stop.signalled:
            stop.signalled = True
            self.log("info", "notices", f"{name} after the {stop.reason}: the same preemption; "
                     "the emergency checkpoint under way goes on (a second signal forces the stop)")
            return False
        return True

    def _acknowledge_notices(self, event_id: str | None = None) -> None:
        """Let the platform go ahead (Azure StartRequests): the stop's events, or one event."""
        if self.notices is None:
            return
        ids = [event_id] if event_id else [i for i in (
            [self.stop.notice.event_id if self.stop and self.stop.notice else None] + self._pending_acks) if i]
        for i in ids:
            if self.stop is not None and i in self.stop.acked:
                continue
            if self.stop is not None:
                self.stop.acked.add(i)
            self.notices.acknowledge(i)

    def _after_stop(self, code: int) -> None:
        """The run ends after a stop: journal how the notice went, acknowledge it, requeue under SLURM."""
        stop = self.stop
        assert stop is not None
        notice = stop.notice
        if notice is not None:
            committed = code == exitcodes.PREEMPTED
            at = stop.committed_at
            if committed and at is None and self.last_checkpoint and self.last_checkpoint.get("kind") == "emergency":
                at = self.last_checkpoint.get("time")
            margin = round(notice.deadline - at, 3) if committed and at is not None and notice.deadline else None
            result = {"committed": committed, "committed_at": at, "step": stop.committed_step,
                      "margin_seconds": margin, "before_deadline": None if margin is None else margin >= 0,
                      "no_checkpoint": stop.no_checkpoint, "exit_code": code}
            self._event("info" if committed else "warning", "notice_result",
                        f"{notice.source} {notice.kind} notice: " + (
                            f"emergency checkpoint committed {margin:.1f} s before the deadline" if margin is not None
                            else "emergency checkpoint committed" if committed
                            else "no emergency checkpoint; the last committed one stays"),
                        source=notice.source, kind=notice.kind, received=notice.received, deadline=notice.deadline,
                        lead_seconds=notice.lead, **result)
            if self.notice is not None:
                self.notice.update(pending=False, **result)
        self._acknowledge_notices()
        if self.cfg.slurm.requeue and code == exitcodes.PREEMPTED and stop.reason != "ckptd stop" and not stop.joined:
            self._slurm_requeue()

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
        handler = getattr(self, f"_msg_{peer.role}_{msg['type']}", None)
        if handler is None:
            if msg["type"] != protocol.HELLO:
                self.control.send(peer, protocol.ERROR,  # type: ignore[union-attr]
                                  error=f"unexpected {msg['type']!r} from a {peer.role}")
            return
        handler(peer, msg)

    def _msg_trainer_hello(self, peer: Peer, msg: dict[str, Any]) -> None:
        self.log("info", "trainer", f"trainer pid {peer.pid} (rank {_fmt(peer.rank)}) connected")
        self._trainer_seen = True
        if self.life is not None:
            self.life.connected = True
            self._metric("trainer_connected")
        if self.sm.state is S.STOPPING and self.stop is not None and not (self.life and self.life.hang):
            self.control.send(peer, protocol.STOP, request_id=self.stop.request_id,  # type: ignore[union-attr]
                              deadline=self.stop.deadline_wall, reason=self.stop.reason)

    def _msg_trainer_heartbeat(self, peer: Peer, msg: dict[str, Any]) -> None:
        self._saw_step(msg.get("step"), completed=True)
        self._metric("train_metrics", msg.get("metrics"))

    def _msg_trainer_restored(self, peer: Peer, msg: dict[str, Any]) -> None:
        step = msg.get("step")
        self._saw_step(step)
        self._metric("restored", step, msg.get("seconds"))
        if msg.get("path"):
            self._resumed_from = os.path.basename(str(msg["path"]).rstrip("/"))
        # Journal the life's first report only: every rank restores the step the job agreed on, and the first
        # is as good as any (peer.rank is the global rank: on node K > 0 of a multi-node job no rank 0 reports).
        if self._restore_reported:
            return
        self._restore_reported = True
        expected, self._expected_resume = self._expected_resume, None
        more = expected - step if metricsmod.is_step(step) and expected is not None and step < expected else 0
        said, extra = f"trainer restored step {_fmt(step)} from {msg.get('path')}", {}
        if more:  # the newest checkpoint did not verify (quarantined); RunMetrics._on_resumed counts the steps
            said += f", not step {expected}: the newer checkpoint did not verify ({more} more steps lost)"
            extra = {"expected_step": expected, "more_lost_steps": more}
        self._event("warning" if more else "info", "resumed", said, step=step, path=msg.get("path"),
                    restart_count=self.restarts, seconds=msg.get("seconds"), **extra)

    def _msg_trainer_saved(self, peer: Peer, msg: dict[str, Any]) -> None:
        step, path, kind = msg.get("step"), str(msg.get("path") or ""), msg.get("kind")
        self._saw_step(step, completed=True)
        name = os.path.basename(path.rstrip("/"))
        self._metric("saved", msg, name)
        if kind == "emergency":
            self._emergency_committed(step, self.clock.time())
        for request_id in _request_ids(msg):
            self._acknowledge_notices(self._notice_saves.pop(request_id, None))
        if self._person_saves & set(_request_ids(msg)):
            self._person_saves.difference_update(_request_ids(msg))
            self._guarded("pin", self._pin_asked_for, name)
        self.last_checkpoint = _ckpt_record(name, step, kind, self.clock.time())
        if name not in self._journaled or msg.get("replaced") is True:  # replaced: the state at close()
            self._journaled.add(name)
            self._event("info", "checkpoint", f"checkpoint committed: {name} (step {_fmt(step)}, {kind})",
                        name=name, step=step, kind=kind, path=path, bytes=msg.get("bytes"),
                        seconds=msg.get("seconds"), paused_seconds=msg.get("paused_seconds"),
                        request_id=msg.get("request_id"))
            self._save_state()
        self._answer_waiters(msg, protocol.SAVED)

    def _msg_trainer_pruning(self, peer: Peer, msg: dict[str, Any]) -> None:
        names = msg.get("names")
        if not isinstance(names, list):
            return
        for name in names[:MAX_PRUNING]:
            if isinstance(name, str) and 0 < len(name) <= 255:
                self._pruning[name] = None
        while len(self._pruning) > MAX_PRUNING:  # a name announced but never deleted must not grow it for ever
            del self._pruning[next(iter(self._pruning))]

    def _pin_asked_for(self, name: str) -> None:
        """A checkpoint a person asked for is kept until a person removes it: pinned (``.pins/``), so neither
        retention (the trainer's or ours) nor `ckptd prune` deletes it; `ckptd pin --remove` lets it go."""
        from .. import store

        if store.NAME_RE.match(name) and os.path.isdir(os.path.join(self.root, name)):
            store.pin(self.root, name)
            self.log("info", "pinned", f"{name} pinned: asked for by a person, kept until `ckptd pin --remove`")

    def _msg_trainer_save_failed(self, peer: Peer, msg: dict[str, Any]) -> None:
        self._event("error", "save_failed", f"checkpoint failed in the trainer: {msg.get('error')}",
                    step=msg.get("step"), kind=msg.get("kind"), error=msg.get("error"), errno=msg.get("errno"))
        for request_id in _request_ids(msg):
            self._acknowledge_notices(self._notice_saves.pop(request_id, None))
        self._answer_waiters(msg, protocol.SAVE_FAILED)

    def _answer_waiters(self, msg: dict[str, Any], reply: str) -> None:
        """One save can answer several requests (they merge when they reach the trainer in the same step)."""
        fields = {k: v for k, v in msg.items() if k not in ("type", "request_ids")}
        for request_id in _request_ids(msg):
            for waiter in self.saves.pop(request_id, []):
                self._reply_and_close(waiter, reply, **{**fields, "request_id": request_id})

    def _reply_and_close(self, peer: Peer, type_: str, **fields: Any) -> None:
        if self.control is not None:
            peer.waiting = False
            self.control.send(peer, type_, **fields)
            self.control.close_after_flush(peer)

    def _msg_trainer_warning(self, peer: Peer, msg: dict[str, Any]) -> None:
        """A trainer's report (protocol.TRAINER_WARNINGS): logged (escaped by the log) and journaled, every field
        bounded."""
        event = msg.get("event")
        if event not in protocol.TRAINER_WARNINGS:
            return
        fields: dict[str, Any] = {"pid": peer.pid}
        for key in ("step", "restored_step"):
            if metricsmod.is_step(msg.get(key)):
                fields[key] = msg[key]
        seconds = msg.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < 1e9:
            fields["seconds"] = float(seconds)
        if msg.get("reached") is True:
            fields["reached"] = True
        if isinstance(msg.get("where"), str):
            fields["where"] = msg["where"][:500]
        text = (msg["message"] if isinstance(msg.get("message"), str) else event)[:1000]  # the log escapes it
        self._event("warning", event, f"trainer pid {peer.pid}: {text}", **fields)

    def _msg_trainer_stopping(self, peer: Peer, msg: dict[str, Any]) -> None:
        self._saw_step(msg.get("step"))
        code = msg.get("exit_code")  # the stop's outcome (a rank of torchrun under us exits 0 for 85)
        if code == exitcodes.PREEMPTED and self.life is not None:
            self.life.stopped_with_checkpoint = True
        self.log("info", "stopping", f"trainer pid {peer.pid} stops at step {_fmt(msg.get('step'))}: "
                 + ("emergency checkpoint committed" if code == exitcodes.PREEMPTED else f"outcome {_fmt(code)}"))
        if self.stop is None and self.sm.state is S.RUNNING:
            self._join_stop(peer, msg)
        reason = msg.get("reason")
        if isinstance(reason, str) and reason and self.stop is not None and self.stop.no_checkpoint is None:
            self.stop.no_checkpoint = reason[:2000]
            self._event("warning", "emergency_skipped", f"trainer pid {peer.pid}: {self.stop.no_checkpoint}",
                        pid=peer.pid, step=msg.get("step"), reason=self.stop.no_checkpoint)

    def _msg_client_save(self, peer: Peer, msg: dict[str, Any]) -> None:
        wait = bool(msg.get("wait"))
        request_id = self._request_save("ckptd save", waiter=peer if wait else None)
        self._person_saves.add(request_id or "")
        if request_id is None:
            self.control.send(peer, protocol.ERROR, error="no trainer is connected: the script does not use "  # type: ignore[union-attr]
                              "ckptd.Checkpointer, or it is between restarts", code=exitcodes.FAILURE)
            self.control.close_after_flush(peer)  # type: ignore[union-attr]
            return
        self.control.send(peer, protocol.ACCEPTED, request_id=request_id)  # type: ignore[union-attr]
        if not wait:
            self.control.close_after_flush(peer)  # type: ignore[union-attr]

    def _msg_client_stop(self, peer: Peer, msg: dict[str, Any]) -> None:
        wait = bool(msg.get("wait"))
        request_id = self._request_stop("ckptd stop", waiter=peer if wait else None)
        self.control.send(peer, protocol.ACCEPTED, request_id=request_id)  # type: ignore[union-attr]
        if not wait:
            self.control.close_after_flush(peer)  # type: ignore[union-attr]

    def _msg_client_status(self, peer: Peer, msg: dict[str, Any]) -> None:
        self.control.send(peer, protocol.STATUS, **self.status())  # type: ignore[union-attr]
        self.control.close_after_flush(peer)  # type: ignore[union-attr]

    def _on_close(self, peer: Peer) -> None:
        if peer.role == "trainer":
            self.log("info", "trainer", f"trainer pid {peer.pid} disconnected")
            path = self._stack_path(peer)
            if path and not (self.life and peer in self.life.dumped):
                with contextlib.suppress(OSError):
                    store.unlink_at(path, check=store.private_dir)
        for waiters in self.saves.values():
            if peer in waiters:
                waiters.remove(peer)
        if self.stop is not None and peer in self.stop.waiters:
            self.stop.waiters.remove(peer)

    def _saw_step(self, step: Any, completed: bool = False) -> None:
        if not metricsmod.is_step(step):
            return
        self.step = step
        if self.life is not None:
            self.life.last_step = step
            self.life.stepped = self.life.stepped or completed
        if completed:
            self._metric("step", step)
        if self.policy.observe_step(step):
            self.log("info", "progress", f"training progressed to step {step}: restart budget refilled")

    # --- checkpoint directory -------------------------------------------------------------------

    def _rescan(self) -> None:
        changes = self.view.refresh()
        for info in changes.added:
            if info.kind == "emergency" and self.stop is not None and info.created >= self.stop.requested_at - 1.0:
                self._emergency_committed(info.step, info.created)
            if info.name not in self._journaled:
                self._journaled.add(info.name)
                self._event("info", "checkpoint", f"checkpoint appeared: {info.name} (step {info.step}, {info.kind})",
                            name=info.name, step=info.step, kind=info.kind, path=info.path, bytes=info.bytes)
        for name in changes.removed:
            # Expected deletions (ours, said once by _apply_retention; the trainer's, announced in `pruning`)
            # are journaled without a log line; only an unexpected one is worth the user's attention.
            by = "retention" if name in self._retired else "trainer retention" if name in self._pruning \
                else "someone else"
            self._retired.discard(name)
            self._pruning.pop(name, None)
            self._journaled.discard(name)
            self._event("info", "checkpoint_removed", f"checkpoint {name} removed ("
                        + (by if by != "someone else" else "not by the supervisor nor by the trainer's retention: "
                           "`ckptd prune` or a person") + ")", name=name, by=by, quiet=by != "someone else")
        for info in changes.invalid:
            self._event("warning", "checkpoint_invalid", f"checkpoint {info.name} is invalid: {info.reason}",
                        name=info.name, reason=info.reason)
        latest = self.view.latest()
        if latest is not None and (self.last_checkpoint is None or latest.name != self.last_checkpoint["name"]):
            self.last_checkpoint = _ckpt_record(latest.name, latest.step, latest.kind, latest.created)
            self._save_state()
        if changes.added and self.cfg.retention_enabled:
            self._apply_retention()

    def _remove_stale_trash(self) -> None:
        """A deletion killed between its rename and its rmtree leaves ``.trash-*``; nothing else removes it."""
        from .. import retention

        try:
            removed = retention.remove_stale_trash(self.root)
        except OSError as exc:
            self.log("warning", "retention", f"cannot remove leftovers of an interrupted deletion: {exc}")
            return
        if removed:
            self.log("info", "retention", f"removed leftovers of an interrupted deletion: {', '.join(removed)}")

    def _apply_retention(self) -> None:
        from .. import retention

        policy = retention.Policy(keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every,
                                  keep_best=tuple(retention.Best(m, k, mode) for m, k, mode in self.cfg.keep_best))
        latest = self.view.latest()
        try:
            pins = {n for n in (latest.name if latest else None, self._resumed_from) if n}
            deleted = retention.apply(self.root, policy, pinned=pins)
        except (OSError, CkptdError) as exc:
            self.log("error", "retention", f"retention failed, will retry after the next checkpoint: {exc}")
            return
        if deleted:
            self._retired.update(deleted)
            self.log("info", "retention", f"retention deleted {', '.join(deleted)}")

    # --- status and shutdown --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        life = self.life
        trainers = self.control.trainers() if self.control else []
        return {
            "dir": self.root, "run_id": self.run_id, "state": self.sm.state.value,
            "job_id": self.node.job_id, "node_rank": self.node.rank,
            "supervisor_pid": os.getpid(), "child_pid": life.child.pid if life else None,
            "trainers": [{"pid": p.pid, "rank": p.rank} for p in trainers],
            "step": self.step, "last_checkpoint": self.last_checkpoint, "restarts": self.restarts,
            "last_exit": self.last_exit, "started": self.started,
            "uptime": round(self.clock.time() - self.started, 3), "exit_code": self.exit_code,
            "socket": self.control.path if self.control else None, "updated": self.clock.time(),
            "notice": self.notice,
            "metrics": {**self._metrics_endpoint(), **self.metrics.status()},
        }

    def _service_view(self) -> ServiceView:
        trainers = self.control.trainers() if self.control else []
        life, stop = self.life, self.stop
        return ServiceView(
            state=self.sm.state.value, step=self.step, last_checkpoint=self.last_checkpoint, restarts=self.restarts,
            quiet_since=min(p.last_seen for p in trainers) if trainers else None,
            stop_reason=stop.reason if stop else None, stop_deadline=life.deadline if life else None,
            hang=bool(life and life.hang), backoff_until=self._backoff_until, exit_code=self.exit_code,
            exit_text=exitcodes.DESCRIPTIONS.get(self.exit_code, "") if self.exit_code is not None else "",
            root=self.root)

    def _save_state(self) -> None:
        try:
            write_json_atomic(os.path.join(self.run_dir, STATE_NAME), self.status())
        except OSError as exc:  # a full or failing disk must not stop supervision; status still answers live
            n = self._faults["state.json"] = self._faults.get("state.json", 0) + 1
            reason = exc.strerror or str(exc)
            if n == 1 or n % 100 == 0 or reason != self._fault_reason.get("state.json"):  # a new cause is news
                self._fault_reason["state.json"] = reason
                self.log("warning", "state", f"cannot write {STATE_NAME} ({exc.strerror or exc}); "
                         f"`ckptd status` of a stopped run may be stale ({n} failed writes)")

    def _event(self, level: str, event: str, msg: str, *, lines: list[str] | None = None, quiet: bool = False,
               **fields: Any) -> None:
        """Log (unless ``quiet``: routine, the journal is enough), journal and count one event; ``lines``: a
        multi-line block for the text log only."""
        if not quiet:
            self.log(level, event, msg, lines=lines or (), **fields)
        if self.journal is not None:
            self.journal.append(event, run_id=self.run_id, **fields)
        self._metric("on_event", event, fields)

    # --- metrics (supervisor/metrics.py, docs/metrics.md) -------------------------------------------

    @staticmethod
    def _new_registry() -> Any:
        from prometheus_client import CollectorRegistry

        return CollectorRegistry(auto_describe=True)

    def _metric(self, method: str, *args: Any) -> None:
        """Feed the run's metrics; a bug there is logged once and never disturbs supervision."""
        self._guarded("metrics", getattr(self.metrics, method), *args)

    def _latest_step(self) -> int | None:
        latest = self.view.latest()
        return latest.step if latest is not None else None

    def _publish_metrics(self) -> None:
        self.metrics.publish(state=self.sm.state.value, stopping=self.stop is not None, exit_code=self.exit_code,
                             step=self.step, last_checkpoint=self.last_checkpoint, valid=len(self.view.valid))

    def _metrics_endpoint(self) -> dict[str, Any]:
        server = self.metrics_server
        return server.endpoint.as_dict() if server is not None else metricsmod.Endpoint("off").as_dict()

    def _start_metrics(self) -> None:
        """Serve /metrics and /healthz. A busy or bad address never stops training: one warning."""
        mc = self.cfg.metrics
        if not mc.addr:
            return
        self._publish_metrics()
        self.metrics_server = metricsmod.MetricsServer(self.metrics.registry, lambda: self.metrics.healthy)
        endpoint = self.metrics_server.start(mc.addr)
        if endpoint.state != "serving":
            self.log("warning", "metrics", f"metrics unavailable: {endpoint.error}; training goes on without "
                     "them (choose another --metrics-addr, port 0 for any free port, or 'off')")
            return
        self.log("info", "metrics", f"serving metrics on http://{endpoint.addr}/metrics (also /healthz)")
        if mc.sd_file:
            path = metricsmod.sd_path(mc.sd_file, self.run_id)
            try:
                metricsmod.write_sd_file(path, endpoint.addr or "", {})
            except OSError as exc:
                self.log("warning", "metrics", f"cannot write the Prometheus file_sd entry {path} "
                         f"({exc.strerror or exc}); Prometheus will not discover this run through it")
                return
            self._sd_file = endpoint.sd_file = path

    def _linger_seconds(self) -> float:
        """How long the final state will still be served after the run ended (0: not at all)."""
        server = self.metrics_server
        return self.cfg.metrics.linger if server is not None and server.endpoint.state == "serving" else 0.0

    def _stop_metrics(self) -> None:
        """After the run: serve the final state for ``metrics.linger`` seconds (a signal ends that), then close.

        The file_sd entry stays until then: Prometheus keeps scraping the target, so it sees how the run ended
        (``stopped``, ``gave_up``: the alerts of docs/metrics.md need that scrape)."""
        server = self.metrics_server
        if server is None:
            return
        self._publish_metrics()
        linger = self._linger_seconds()
        if linger > 0:
            self.log("info", "metrics", f"serving the final metrics on http://{server.endpoint.addr}/metrics for "
                     f"{linger:g} s more (--metrics-linger), then exiting with {self.exit_code}; SIGTERM or "
                     "Ctrl-C ends the wait")
        end = self.clock.monotonic() + linger
        while self.clock.monotonic() < end and not self._signalled_during_linger():
            self._poll_io(min(1.0, max(0.0, end - self.clock.monotonic())))
        if self._sd_file is not None:
            with contextlib.suppress(OSError):
                metricsmod.remove_sd_file(self._sd_file)
        server.close()

    def _signalled_during_linger(self) -> bool:
        while True:
            try:
                event = self.queue.get_nowait()
            except queue.Empty:
                return False
            if event[0] == "signal" and event[1] in (signal.SIGTERM, signal.SIGINT):
                return True

    def _finish(self) -> None:
        if self.life is not None:  # an exception escaped the loop: leave nothing running
            with self.spare.released():
                self.procs.kill_all(self.life.child)
        self.schedules.shutdown()
        if self.notices is not None:
            self.notices.close()  # sends the acknowledgements asked for, bounded
        self.watcher.stop()
        if self.control is not None:
            if self.stop is not None:
                linger = self._linger_seconds()
                for peer in self.stop.waiters:
                    self.control.send(peer, protocol.STOPPED, exit_code=self.exit_code, linger=linger)
            for waiters in self.saves.values():
                for peer in waiters:
                    self.control.send(peer, protocol.SAVE_FAILED, error="the run ended before the checkpoint")
            self.control.flush(self.clock.monotonic() + 2.0)
            self.control.close()
        if self.exit_code is None:
            self.exit_code = exitcodes.FAILURE
        self._metric("training_ended")
        self.service.exited(self.exit_code, exitcodes.DESCRIPTIONS.get(self.exit_code, "the child's exit code"))
        self.notifier.close()
        self._save_state()
        self._guarded("metrics endpoint", self._stop_metrics)
        if self.journal is not None:
            self.journal.close()
        self.procs.shutdown()
        self.spare.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _request_ids(msg: dict[str, Any]) -> list[str]:
    ids = msg.get("request_ids")
    if isinstance(ids, list):
        return [str(i) for i in ids if i]
    return [i for i in str(msg.get("request_id") or "").split(",") if i]  # older trainers joined them with ","


def _slurm_env() -> dict[str, Any]:
    """SLURM's view of this job for the journal's `start` event (requeued jobs count their restarts)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return {"slurm": {"job_id": os.environ["SLURM_JOB_ID"],
                      "restart_count": int(count) if count.isdigit() else 0}}


def _ckpt_record(name: str, step: Any, kind: Any, created: float) -> dict[str, Any]:
    return {"name": name, "step": step, "kind": kind, "time": created}


def _resume_text(resume: dict[str, Any]) -> str:
    """Where a restart resumes, and what it costs when that is known."""
    step, lost = resume["resume_step"], resume["lost_steps"]
    if step is None:
        return "no checkpoint yet"
    if lost is None:  # the life ended before its trainer reported any step (even its restore)
        return f"resuming from step {step} (the trainer reported no step before it exited)"
    return f"resuming from step {step}, {lost} steps lost"


def _fmt(value: Any) -> str:
    return "?" if value is None else str(value)

