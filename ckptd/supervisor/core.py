"""The supervisor's decisions: a typed event and a view of the moment in, typed actions out.

:class:`Core` owns the child's state machine (states.py) and the run's decision state
(:class:`~ckptd.supervisor.ledger.Ledger`); the stop protocol is stopping.py, the control messages are
messages.py, the restart rules policy.py. The loop (loop.py) carries out what it returns. Nothing here
touches a process, a socket, a file or a clock: tests feed events with made-up times
(tests/test_supervisor_core.py).

    >>> from ckptd.supervisor import actions as act
    >>> from ckptd.supervisor.config import Config
    >>> core = Core(Config(dir="/ck"))
    >>> core.handle(act.Start(), act.View(now=0.0, wall=0.0))
    [Spawn(restarts=0)]
"""

from __future__ import annotations

import signal
from typing import Any

from .. import exitcodes, protocol
from . import actions as act
from . import config as configmod
from . import messages, stopping
from .config import Config
from .ledger import Ledger, Life, ckpt_record, fmt, stack_path
from .policy import ExitStatus, Outcome, Reason, RestartPolicy, classify
from .states import ChildState

S = ChildState
STACK_WAIT = 1.0  # seconds between asking hung trainers for their stacks and reading them
STARTUP_WINDOW = 30.0  # a script that never connects and dies within this counts as failing to start


class Core:
    def __init__(self, cfg: Config, *, policy: RestartPolicy | None = None, socket_dir: str = "") -> None:
        policy = policy or RestartPolicy(
            max_restarts=cfg.max_restarts, window=cfg.restart_window, base=cfg.backoff_base, cap=cfg.backoff_max,
            same_step_limit=cfg.same_step_crashes, start_failure_limit=cfg.start_failures)
        self.led = Ledger(cfg, policy, socket_dir=socket_dir)

    @property
    def state(self) -> ChildState:
        return self.led.sm.state

    @property
    def terminal(self) -> bool:
        return self.led.sm.terminal

    def handle(self, event: act.Event, view: act.View) -> list[act.Action]:
        """Decide what ``event`` means at ``view``; the actions to carry out, in order."""
        led = self.led
        if isinstance(event, act.Start):
            led.emit(act.Spawn(led.restarts))
        elif isinstance(event, act.Spawned):
            self._spawned(view, event.pid)
        elif isinstance(event, act.SpawnFailed):
            led.event("error", "spawn_failed", event.message, error=event.error)
            self._after_failure(view, None, Reason.ERROR.value, before_first_step=True)
        elif isinstance(event, act.ChildExited):
            self._exited(view, event)
        elif isinstance(event, act.SignalReceived):
            self._signal(view, event.signum)
        elif isinstance(event, act.ScheduledSave):
            led.request_save(view, f"schedule ({event.label})", kind="manual")
        elif isinstance(event, act.NoticeReceived):
            stopping.on_notice(led, view, event.notice)
        elif isinstance(event, (act.TrainerMessage, act.ControlRequest)):
            messages.handle(led, view, event.peer, event.msg)
        elif isinstance(event, act.PeerClosed):
            self._peer_closed(event)
        elif isinstance(event, act.Rescanned):
            self._rescanned(view, event)
        elif isinstance(event, act.Timer):
            self._timers(view)
        return led.take()

    def next_due(self, view: act.View) -> float | None:
        """When a :class:`~ckptd.supervisor.actions.Timer` next has work (monotonic)."""
        return self.led.next_due(view)

    def finish(self, linger: float) -> list[act.Action]:
        """The supervisor shuts down: the answers still owed to waiting clients."""
        stopping.finish(self.led, linger)
        return self.led.take()

    def reload(self, cfg: Config) -> None:
        self.led.cfg = cfg

    # --- the child ------------------------------------------------------------------------------

    def _spawned(self, view: act.View, pid: int) -> None:
        led = self.led
        led.life = Life(pid, view.now)
        led.restore_reported = False
        led.sm.to(S.RUNNING)  # IDLE/BACKOFF -> RUNNING
        if led.resume is not None:
            led.event("info", "restart", f"restart #{led.restarts} (pid {pid}) after {led.resume['reason']}; "
                      + _resume_text(led.resume), restart_count=led.restarts, pid=pid, **led.resume)
            led.expected_resume, led.resume = led.resume["resume_step"], None
        else:
            led.event("info", "spawn", f"started pid {pid}", pid=pid, restart_count=led.restarts)
        led.save_state()

    def _exited(self, view: act.View, ev: act.ChildExited) -> None:
        led, life, status = self.led, self.led.life, ev.status
        if life is None:
            return
        led.life = None
        outcome = classify(status, stop_requested=led.stop is not None, hang=life.hang, we_killed=life.we_killed,
                           oom_kills=ev.oom_kills, system_oom_kills=ev.system_oom_kills,
                           no_restart=frozenset(led.cfg.no_restart_exit_codes))
        if status.code == 0 and led.stop is not None and life.stopped_with_checkpoint:
            # torchrun under `ckptd run`: the ranks exit 0 after the emergency checkpoint (distributed.py,
            # clean_stop_exit_code) so that torchrun ends quietly; this is the stop, not the end of training.
            outcome = Outcome(Reason.PREEMPTED, f"{status.describe()}: its ranks stopped after the emergency "
                                                "checkpoint")
        for request_id in list(led.saves):  # nobody is left to answer them
            for waiter in led.saves.pop(request_id):
                led.reply_and_close(waiter, protocol.SAVE_FAILED, request_id=request_id, error=f"the trainer exited "
                                    f"({status.describe()}) before committing the checkpoint")
        uptime = view.now - life.started
        led.last_exit = {"pid": status.pid, "code": status.code, "signal": status.signal,
                         "reason": outcome.reason.value, "detail": outcome.detail, "step": life.last_step,
                         "time": view.wall}
        level = "info" if outcome.reason in (Reason.FINISHED, Reason.PREEMPTED) else "warning"
        led.event(level, "exit", f"pid {status.pid} {outcome.detail} at step {fmt(life.last_step)} "
                  f"after {uptime:.1f} s" + (f"; killed {ev.leftovers} leftover process(es)" if ev.leftovers else ""),
                  uptime=round(uptime, 3), leftovers_killed=ev.leftovers, **led.last_exit)
        self._judge(view, life, status, outcome, uptime, ev.stderr_tail)

    def _judge(self, view: act.View, life: Life, status: ExitStatus, outcome: Outcome, uptime: float,
               tail: tuple[bytes, ...]) -> None:
        led = self.led
        if outcome.reason is Reason.FINISHED:
            stopping.end(led, S.EXITED, exitcodes.OK, "training finished")
        elif led.stop is not None:
            stopping.judge_stopped_exit(led, life, status, outcome.reason is Reason.PREEMPTED)
        elif outcome.reason is Reason.PREEMPTED:
            stopping.end(led, S.EXITED, exitcodes.PREEMPTED, "the trainer was stopped from outside (SIGTERM) "
                                                             "and committed an emergency checkpoint")
        elif outcome.reason is Reason.NO_RESTART:
            stopping.end(led, S.EXITED, status.code or exitcodes.FAILURE, f"not restarting: {outcome.detail}")
        else:
            # Failing to start: no step in this life (a script using the library never reached ck.step();
            # one that never connected died within STARTUP_WINDOW). docs/supervisor.md, "Restarts".
            early = not life.stepped and (life.connected or uptime < STARTUP_WINDOW)
            self._after_failure(view, life.last_step, outcome.reason.value, before_first_step=early, tail=tail)

    def _after_failure(self, view: act.View, step: int | None, reason: str, *, before_first_step: bool = False,
                       tail: tuple[bytes, ...] = ()) -> None:
        led = self.led
        decision = led.policy.on_failure(view.now, step, before_first_step=before_first_step)
        if not decision.restart:
            lines = [t.decode("utf-8", "replace") for t in tail if t.strip()]
            shown = "; the script's last stderr lines:" if lines else ""
            led.event("error", "give_up", f"giving up: {decision.why}{shown}", lines=lines, why=decision.why,
                      restarts=led.restarts, stderr_tail=lines)
            stopping.end(led, S.FATAL, exitcodes.GAVE_UP, "gave up")
            return
        if not led.trainer_seen and led.restarts == 0:
            led.log("warning", "restart", "the script never connected to the supervisor (it does not use "
                    "ckptd.Checkpointer): every restart begins from scratch, not from a checkpoint")
        resume = view.latest_step  # current: the loop rescanned the directory before the exit
        lost = max(0, step - resume) if step is not None and resume is not None else step
        led.resume = {"reason": reason, "crash_step": step, "resume_step": resume, "lost_steps": lost,
                      "delay": round(decision.delay, 3)}
        led.restarts += 1
        led.backoff_until = view.now + decision.delay
        led.sm.to(S.BACKOFF)
        led.event("info", "backoff", f"restarting in {decision.delay:.2f} s "
                  f"({led.policy.restarts_in_window}/{led.cfg.max_restarts} restarts in the window)",
                  delay=round(decision.delay, 3), restart_count=led.restarts)
        led.save_state()

    # --- signals, timers ------------------------------------------------------------------------

    def _signal(self, view: act.View, signum: int) -> None:
        led = self.led
        name = signal.Signals(signum).name
        led.emit(act.Journal("notice", {"signal": name, "state": led.sm.state.value}))
        if signum == configmod.signal_number(led.cfg.requeue_signal):
            led.metric("signal_notice", "requeue")
            stopping.request_stop(led, view, f"{name} (requeue)")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            led.metric("signal_notice", "signal")
            stopping.request_stop(led, view, name, force=stopping.second_stop(led, name))
        elif signum == signal.SIGUSR1:
            led.person_saves.add(led.request_save(view, name) or "")
        elif signum == signal.SIGHUP:
            led.emit(act.Reload())

    def _timers(self, view: act.View) -> None:
        led, life = self.led, self.led.life
        if led.sm.state is S.STOPPING and life and life.deadline is not None and view.now >= life.deadline:
            self._kill(life, "the hang grace ran out" if life.hang else "the grace period ran out")
        if led.sm.state is S.BACKOFF and led.backoff_until is not None and view.now >= led.backoff_until:
            led.backoff_until = None
            led.emit(act.Spawn(led.restarts))  # BACKOFF -> RUNNING once it started
        hang_due = led.hang_due(view)
        if hang_due is not None and view.now >= hang_due and led.life is not None:
            self._hang(view, led.life)

    def _kill(self, life: Life, why: str) -> None:
        life.we_killed = True
        life.deadline = None
        self.led.emit(act.Kill(why))
        self.led.sm.to(S.KILLING)  # STOPPING -> KILLING

    def _hang(self, view: act.View, life: Life) -> None:
        """A trainer went silent: dump its stacks, SIGTERM, and SIGKILL after the short hang grace.

        A hung trainer cannot write a checkpoint, so it does not get the preemption grace.
        """
        led, now, trainers = self.led, view.now, view.trainers
        silent = now - min(p.last_seen for p in trainers)
        hung = tuple(p for p in trainers if now - p.last_seen >= led.cfg.hang_timeout) or trainers
        # Every rank's stacks, not only the silent one's: its peers blocked in a collective show where the job
        # stands, and a rank that cannot dump (SIGSTOPped, stuck in the kernel) leaves only theirs.
        asked = tuple(p for p in trainers if p.stack_signal and stack_path(p, led.socket_dir))
        due = now + min(STACK_WAIT, led.cfg.hang_grace / 2) if asked else None
        led.emit(act.DumpStacks(hung, trainers, asked, due))
        led.event("warning", "hang", f"no heartbeat for {silent:.1f} s (hang_timeout {led.cfg.hang_timeout:g} s) "
                  f"from pid {', '.join(str(p.pid) for p in hung)}; "
                  + (f"dumping {len(asked)} stack(s), " if asked else "")
                  + f"SIGTERM to pid {life.pid}, SIGKILL in {led.cfg.hang_grace:g} s",
                  step=life.last_step, silent=round(silent, 3), pids=[p.pid for p in hung])
        life.hang = True
        life.deadline = now + led.cfg.hang_grace
        led.emit(act.SignalChild(signal.SIGTERM))
        led.sm.to(S.STOPPING)  # RUNNING -> STOPPING

    # --- the control channel and the directory --------------------------------------------------

    def _peer_closed(self, ev: act.PeerClosed) -> None:
        led = self.led
        for waiters in led.saves.values():
            if ev.peer in waiters:
                waiters.remove(ev.peer)
        if led.stop is not None and ev.peer in led.stop.waiters:
            led.stop.waiters.remove(ev.peer)

    def _rescanned(self, view: act.View, ev: act.Rescanned) -> None:
        led = self.led
        life = led.life
        born = view.wall - (view.now - life.started) if life is not None else None
        for _name, step, kind, created in ev.added:
            if kind == "emergency" and led.stop is not None and created >= led.stop.requested_at - 1.0:
                stopping.emergency_committed(led, step, created)
            # A checkpoint this life wrote is a step it reached, also when the trainer died before saying so:
            # heartbeats come at most once a second, and a life that crashes sooner would otherwise be taken
            # for one that crashed at its first reported step (the same-step rule gave up on progress so).
            if life is not None and born is not None and created >= born and \
                    (life.last_step is None or step > life.last_step):
                led.saw_step(step, completed=True)
        if ev.emergency is not None:
            stopping.emergency_committed(led, *ev.emergency)
        latest = ev.latest
        if latest is not None and (led.last_checkpoint is None or latest[0] != led.last_checkpoint["name"]):
            led.last_checkpoint = ckpt_record(*latest)
            led.save_state()

    def status(self) -> dict[str, Any]:
        """The decision state ``ckptd status`` shows (the loop adds pids, trainers, socket, metrics)."""
        led = self.led
        return {"state": led.sm.state.value, "step": led.step, "last_checkpoint": led.last_checkpoint,
                "restarts": led.restarts, "last_exit": led.last_exit, "exit_code": led.exit_code,
                "notice": led.notice}


def _resume_text(resume: dict[str, Any]) -> str:
    """Where a restart resumes, and what it costs when that is known."""
    step, lost = resume["resume_step"], resume["lost_steps"]
    if step is None:
        return "no checkpoint yet"
    if lost is None:  # the life ended before its trainer reported any step (even its restore)
        return f"resuming from step {step} (the trainer reported no step before it exited)"
    return f"resuming from step {step}, {lost} steps lost"
