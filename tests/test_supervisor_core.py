"""The supervisor's core (core.py), in-process: events and a made-up clock in, the actions it decides out.

No process, socket or file: a trainer is a ``Peer`` without a socket, time moves when a test says so.
Every state of states.py and the awkward orders (a notice during backoff, a stop before the first step,
a second stop, a hang while stopping, a crash loop, a stop during a save, a trainer that exits 0 during a
stop) are decided here in milliseconds; tests/test_supervisor_run.py and friends prove the I/O end to end.
"""

from __future__ import annotations

import itertools
import random
import signal

import pytest

from ckptd import exitcodes, protocol
from ckptd.supervisor import actions as act
from ckptd.supervisor.config import Config, SlurmConfig
from ckptd.supervisor.control import Peer
from ckptd.supervisor.core import STARTUP_WINDOW, Core
from ckptd.supervisor.notices import Notice
from ckptd.supervisor.policy import ExitStatus, RestartPolicy
from ckptd.supervisor.states import ChildState as S

pytestmark = pytest.mark.kind("unit")

WALL = 1_700_000_000.0
SOCKET_DIR = "/run/ckptd-test"
_ids = itertools.count(1)


class Run:
    """A core, a fake clock, the connected trainers and the newest checkpoint's step, as the loop would see them."""

    def __init__(self, **cfg) -> None:
        config = Config(dir="/ck", **cfg)
        policy = RestartPolicy(max_restarts=config.max_restarts, window=config.restart_window,
                               base=config.backoff_base, cap=config.backoff_max,
                               same_step_limit=config.same_step_crashes, start_failure_limit=config.start_failures,
                               rng=random.Random(0))
        self.core = Core(config, policy=policy, socket_dir=SOCKET_DIR)
        self.now = 1000.0
        self.trainers: list[Peer] = []
        self.latest_step: int | None = None
        self.pid = 4000

    @property
    def state(self) -> S:
        return self.core.state

    @property
    def led(self):
        return self.core.led

    def view(self) -> act.View:
        return act.View(self.now, WALL + self.now, tuple(self.trainers), self.latest_step)

    def send(self, event: act.Event) -> list[act.Action]:
        return self.core.handle(event, self.view())

    def advance(self, seconds: float) -> list[act.Action]:
        self.now += seconds
        return self.send(act.Timer())

    def start(self) -> list[act.Action]:
        assert self.send(act.Start()) == [act.Spawn(self.led.restarts)]
        return self.spawned()

    def spawned(self) -> list[act.Action]:
        self.pid += 1
        return self.send(act.Spawned(self.pid))

    def connect(self, rank: int = 0, stack_signal: int | None = 41) -> Peer:
        pid = 5000 + next(_ids)
        peer = Peer(next(_ids), None, pid, self.now, role="trainer", pid=pid, rank=rank,  # type: ignore[arg-type]
                    stack_signal=stack_signal, stack_file=f"{SOCKET_DIR}/stacks-{pid}.txt")
        self.trainers.append(peer)
        self.send(act.TrainerMessage(peer, {"type": protocol.HELLO}))
        return peer

    def msg(self, peer: Peer, type_: str, **fields) -> list[act.Action]:
        peer.last_seen = self.now
        return self.send(act.TrainerMessage(peer, {"type": type_, **fields}))

    def client(self, type_: str, **fields) -> tuple[Peer, list[act.Action]]:
        peer = Peer(next(_ids), None, 1, self.now, role="client")  # type: ignore[arg-type]
        return peer, self.send(act.ControlRequest(peer, {"type": type_, **fields}))

    def exit(self, code: int | None = None, sig: int | None = None, **kw) -> list[act.Action]:
        self.trainers.clear()
        return self.send(act.ChildExited(ExitStatus(self.pid, code=code, signal=sig), **kw))


def of(actions: list[act.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def events(actions: list[act.Action]) -> list[str]:
    return [a.event for a in of(actions, act.Record)]


def record(actions: list[act.Action], name: str) -> act.Record:
    found = [a for a in of(actions, act.Record) if a.event == name]
    assert found, f"no {name!r} record in {events(actions)}"
    return found[0]


def sends(actions: list[act.Action], type_: str) -> list[act.Send]:
    return [a for a in of(actions, act.Send) if a.type == type_]


def exit_code(actions: list[act.Action]) -> int | None:
    codes = [a.code for a in of(actions, act.Exit)]
    assert len(codes) <= 1
    return codes[0] if codes else None


def notice(action: str = "stop", deadline_in: float | None = 30.0, event_id: str | None = None,
           now: float = 1000.0) -> Notice:
    received = WALL + now
    return Notice("azure" if event_id else "aws", "Preempt" if event_id else "instance-action", action, received,
                  None if deadline_in is None else received + deadline_in, "the machine goes away", event_id)


# --- starting, finishing, crashing --------------------------------------------------------------------


def test_start_spawns_and_a_spawned_child_runs():
    run = Run()
    assert run.state is S.IDLE
    out = run.start()
    assert run.state is S.RUNNING
    assert record(out, "spawn").fields == {"pid": run.pid, "restart_count": 0}
    assert of(out, act.SaveState)


def test_exit_0_finishes_the_run():
    run = Run()
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=7)
    out = run.exit(code=0)
    assert run.state is S.EXITED and exit_code(out) == exitcodes.OK
    assert record(out, "exit").fields["reason"] == "finished"
    assert record(out, "exit").fields["step"] == 7


def test_a_crash_backs_off_then_restarts_from_the_newest_checkpoint():
    run = Run(backoff_base=2.0, backoff_max=2.0)
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=12)
    run.latest_step = 10
    out = run.exit(code=1)
    assert run.state is S.BACKOFF and exit_code(out) is None
    delay = record(out, "backoff").fields["delay"]
    assert 1.0 <= delay <= 2.0
    assert not of(run.advance(delay - 0.01), act.Spawn)  # not before the backoff ends
    assert of(run.advance(0.02), act.Spawn) == [act.Spawn(1)]
    assert run.state is S.BACKOFF  # until the child is started
    out = run.spawned()
    assert run.state is S.RUNNING
    restart = record(out, "restart").fields
    assert (restart["resume_step"], restart["crash_step"], restart["lost_steps"]) == (10, 12, 2)
    # the restarted trainer restores an older step: the newer checkpoint did not verify
    out = run.msg(run.connect(), protocol.RESTORED, step=8, path="/ck/step-8")
    assert record(out, "resumed").fields["more_lost_steps"] == 2


def test_a_crash_loop_before_the_first_step_gives_up_with_the_stderr_tail():
    run = Run(start_failures=3)
    run.start()
    for _ in range(2):
        run.connect()
        out = run.exit(code=1, stderr_tail=(b"Traceback", b"ImportError: no module named foo"))
        assert run.state is S.BACKOFF
        run.advance(record(out, "backoff").fields["delay"] + 0.001)
        run.spawned()
    run.connect()
    out = run.exit(code=1, stderr_tail=(b"Traceback", b"ImportError: no module named foo", b"  "))
    assert run.state is S.FATAL and exit_code(out) == exitcodes.GAVE_UP
    give_up = record(out, "give_up")
    assert "3 times in a row before its first step" in give_up.fields["why"]
    assert give_up.fields["stderr_tail"] == ["Traceback", "ImportError: no module named foo"]


def test_a_script_that_never_connects_and_runs_long_is_not_a_start_failure():
    run = Run(start_failures=1)
    run.start()
    run.now += STARTUP_WINDOW + 1
    out = run.exit(code=1)
    assert run.state is S.BACKOFF, events(out)


def test_the_same_step_crashing_gives_up():
    run = Run(same_step_crashes=2)
    run.start()
    for n in range(2):
        peer = run.connect()
        run.msg(peer, protocol.HEARTBEAT, step=50)
        out = run.exit(sig=signal.SIGSEGV)
        if n == 0:
            run.advance(record(out, "backoff").fields["delay"] + 0.001)
            run.spawned()
    assert run.state is S.FATAL and "step 50 crashed 2 times" in record(out, "give_up").fields["why"]


def test_a_checkpoint_a_life_wrote_is_its_step_when_it_dies_before_its_next_heartbeat():
    # Heartbeats come at most once a second: lives that crash within a second after their first step all said
    # "step 1". The checkpoint the third one wrote (seen in the directory) shows it got further: no give-up.
    run = Run(same_step_crashes=3)
    run.start()
    for n in range(3):
        peer = run.connect()
        run.msg(peer, protocol.HEARTBEAT, step=1)
        if n == 2:
            run.send(act.Rescanned(added=(("step-000000000008", 8, "periodic", WALL + run.now),)))
        out = run.exit(sig=signal.SIGKILL)
        if n < 2:
            run.advance(record(out, "backoff").fields["delay"] + 0.001)
            run.spawned()
    assert run.state is S.BACKOFF, events(out)
    assert record(out, "exit").fields["step"] == 8


def test_a_spawn_failure_backs_off_and_a_second_one_backs_off_again():
    run = Run(start_failures=5)
    run.send(act.Start())
    out = run.send(act.SpawnFailed("[Errno 2] No such file", "cannot start train.py: No such file"))
    assert run.state is S.BACKOFF and record(out, "spawn_failed").msg == "cannot start train.py: No such file"
    spawn = run.advance(record(out, "backoff").fields["delay"] + 0.001)
    assert of(spawn, act.Spawn)
    run.send(act.SpawnFailed("again", "cannot start train.py: again"))
    assert run.state is S.BACKOFF and run.led.restarts == 2


def test_a_do_not_restart_exit_code_ends_the_run_with_it():
    run = Run(no_restart_exit_codes=(3,))
    run.start()
    out = run.exit(code=3)
    assert run.state is S.EXITED and exit_code(out) == 3


def test_an_oom_kill_is_named_and_restarted():
    run = Run()
    run.start()
    out = run.exit(sig=signal.SIGKILL, oom_kills=1)
    assert record(out, "exit").fields["reason"] == "oom" and run.state is S.BACKOFF


# --- stopping -----------------------------------------------------------------------------------------


def test_sigterm_asks_every_trainer_and_exit_85_after_the_emergency_checkpoint():
    run = Run(grace=20.0)
    run.start()
    a, b = run.connect(rank=0), run.connect(rank=1)
    run.msg(a, protocol.HEARTBEAT, step=3)
    out = run.send(act.SignalReceived(signal.SIGTERM))
    stops = sends(out, protocol.STOP)
    assert [s.peer for s in stops] == [a, b]
    assert stops[0].fields["deadline"] == pytest.approx(WALL + run.now + 20.0)
    assert run.state is S.STOPPING and run.led.life.deadline == run.now + 20.0
    assert of(out, act.Journal)[0].fields["signal"] == "SIGTERM"
    assert not of(out, act.SignalChild)  # the trainers speak the protocol: no signal to the child
    run.msg(a, protocol.SAVED, step=3, kind="emergency", path="/ck/step-3")
    assert run.led.stop.confirmed
    run.msg(a, protocol.STOPPING, step=3, exit_code=exitcodes.PREEMPTED)
    out = run.exit(code=exitcodes.PREEMPTED)
    assert run.state is S.EXITED and exit_code(out) == exitcodes.PREEMPTED


def test_a_stop_of_a_script_without_the_library_is_sigterm():
    run = Run()
    run.start()
    out = run.send(act.SignalReceived(signal.SIGINT))
    assert of(out, act.SignalChild) == [act.SignalChild(signal.SIGTERM)]
    assert record(out, "stop_requested").fields["via"] == "SIGTERM"
    out = run.exit(sig=signal.SIGTERM)
    assert exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT
    assert "never connected" in record(out, "end").msg


def test_a_stop_before_the_first_step_says_there_was_nothing_to_checkpoint():
    run = Run()
    run.start()
    run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.exit(code=exitcodes.STOPPED_NO_CHECKPOINT)
    assert exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT
    assert "before the trainer reached its first step" in record(out, "end").msg
    assert not of(out, act.Spawn)


def test_a_second_sigterm_forces_the_stop_with_the_short_grace():
    run = Run(grace=30.0, force_grace=5.0)
    run.start()
    run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    run.now += 2
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert of(out, act.SignalChild) == [act.SignalChild(signal.SIGTERM)]
    assert record(out, "stop_forced").fields["reason"] == "SIGTERM"
    assert run.led.life.deadline == run.now + 5.0
    assert not sends(out, protocol.STOP)  # one stop request: the trainers are not asked again
    assert of(run.advance(5.0), act.Kill) == [act.Kill("the grace period ran out")]
    assert run.state is S.KILLING


def test_the_platforms_sigterm_after_its_notice_is_the_same_preemption_and_a_third_forces():
    run = Run(force_grace=5.0)
    run.start()
    peer = run.connect()
    run.send(act.NoticeReceived(notice(deadline_in=40.0)))
    deadline = run.led.life.deadline
    assert deadline == pytest.approx(run.now + 40.0)
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert not of(out, act.SignalChild) and run.led.life.deadline == deadline
    assert "the same preemption" in of(out, act.Log)[0].msg
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert of(out, act.SignalChild) and run.led.life.deadline == run.now + 5.0
    run.msg(peer, protocol.SAVED, step=1, kind="emergency", path="/ck/step-1")
    out = run.exit(code=exitcodes.PREEMPTED)
    result = record(out, "notice_result").fields
    assert result["committed"] is True and result["margin_seconds"] == pytest.approx(40.0)


def test_a_second_stop_with_no_child_left_ends_at_once():
    run = Run()
    run.start()
    run.send(act.SignalReceived(signal.SIGTERM))
    run.led.life = None  # the child's exit is being handled (reaped, not yet judged)
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert run.state is S.EXITED and exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT


def test_the_grace_running_out_kills_and_the_exit_is_86():
    run = Run(grace=10.0)
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=5)
    run.send(act.SignalReceived(signal.SIGTERM))
    assert not of(run.advance(9.9), act.Kill)
    out = run.advance(0.1)
    assert of(out, act.Kill) == [act.Kill("the grace period ran out")] and run.state is S.KILLING
    out = run.exit(sig=signal.SIGKILL)
    assert exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT
    assert "grace period (10 s) ran out" in record(out, "end").msg
    assert record(out, "exit").fields["reason"] == "stopped"  # our SIGKILL: not an OOM, not restarted


def test_a_stop_during_backoff_ends_at_once_and_starts_nothing():
    run = Run()
    run.start()
    run.exit(code=1)
    assert run.state is S.BACKOFF
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert run.state is S.EXITED and exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT
    assert "while no trainer runs" in record(out, "stop_requested").msg
    assert run.led.backoff_until is None
    assert not of(run.advance(3600), act.Spawn)


def test_a_notice_during_backoff_ends_at_once_without_a_checkpoint():
    run = Run()
    run.start()
    run.exit(code=1)
    out = run.send(act.NoticeReceived(notice()))
    assert run.state is S.EXITED and exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT
    assert events(out).index("notice") < events(out).index("notice_result") < events(out).index("end")
    assert record(out, "notice_result").fields["committed"] is False
    assert run.led.notice["pending"] is False
    assert not of(out, act.Spawn)


def test_a_stop_before_the_first_spawn_ends_at_once():
    run = Run()
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert run.state is S.EXITED and exit_code(out) == exitcodes.STOPPED_NO_CHECKPOINT


def test_a_stop_during_a_save_answers_the_waiting_client_then_stops():
    run = Run()
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=9)
    client, out = run.client(protocol.SAVE, wait=True)
    request_id = sends(out, protocol.ACCEPTED)[0].fields["request_id"]
    assert not sends(out, protocol.ACCEPTED)[0].close and client.waiting
    run.send(act.SignalReceived(signal.SIGTERM))
    # the save in flight commits first; then the emergency checkpoint; the client gets its answer
    out = run.msg(peer, protocol.SAVED, step=9, kind="manual", path="/ck/step-9", request_ids=[request_id])
    answer = sends(out, protocol.SAVED)
    assert answer and answer[0].peer is client and answer[0].close and answer[0].fields["request_id"] == request_id
    assert of(out, act.Pin) == [act.Pin("step-9")]  # a person asked for it
    assert not run.led.stop.confirmed  # a manual checkpoint is not the emergency one
    run.msg(peer, protocol.SAVED, step=9, kind="emergency", path="/ck/step-9", replaced=True)
    assert exit_code(run.exit(code=exitcodes.PREEMPTED)) == exitcodes.PREEMPTED


def test_a_save_still_waited_for_when_the_trainer_exits_fails():
    run = Run()
    run.start()
    run.connect()
    client, _ = run.client(protocol.SAVE, wait=True)
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.exit(code=exitcodes.STOPPED_NO_CHECKPOINT)
    failed = sends(out, protocol.SAVE_FAILED)
    assert failed and failed[0].peer is client and "before committing" in failed[0].fields["error"]


def test_trainer_exit_0_during_a_stop_after_its_checkpoint_is_85():
    run = Run()
    run.start()
    peer = run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    run.msg(peer, protocol.STOPPING, step=4, exit_code=exitcodes.PREEMPTED)  # a torchrun rank exits 0 for 85
    out = run.exit(code=0)
    assert exit_code(out) == exitcodes.PREEMPTED
    assert record(out, "exit").fields["reason"] == "preempted"


def test_trainer_exit_0_during_a_stop_without_a_checkpoint_is_the_end_of_training():
    run = Run()
    run.start()
    run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.exit(code=0)
    assert exit_code(out) == exitcodes.OK and record(out, "exit").fields["reason"] == "finished"


def test_a_trainer_that_skips_the_emergency_checkpoint_says_why():
    run = Run()
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=2)
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.msg(peer, protocol.STOPPING, step=2, exit_code=86, reason="not enough time before the deadline")
    assert record(out, "emergency_skipped").fields["reason"] == "not enough time before the deadline"
    out = run.exit(code=86)
    assert "not enough time before the deadline" in record(out, "end").msg


def test_a_trainer_connecting_during_a_stop_is_asked_to_stop():
    run = Run()
    run.start()
    run.send(act.SignalReceived(signal.SIGTERM))  # no trainer yet: SIGTERM, STOPPING
    peer = Peer(99, None, 77, run.now, role="trainer", pid=77)  # type: ignore[arg-type]
    out = run.send(act.TrainerMessage(peer, {"type": protocol.HELLO}))
    assert [s.peer for s in sends(out, protocol.STOP)] == [peer]


def test_a_stop_elsewhere_is_joined_and_confirmed_by_the_checkpoint_on_disk():
    run = Run(grace=15.0)
    run.start()
    peer = run.connect()
    out = run.msg(peer, protocol.STOPPING, step=6, exit_code=exitcodes.PREEMPTED)
    assert run.state is S.STOPPING and run.led.stop.joined
    assert of(out, act.Rescan) == [act.Rescan(emergency_step=6)]
    assert run.led.life.deadline == run.now + 15.0
    assert not run.led.stop.confirmed
    run.send(act.Rescanned(emergency=(6, WALL + run.now)))
    assert run.led.stop.confirmed
    out = run.exit(code=1)  # torchrun exits 1 when its ranks exit 85
    assert exit_code(out) == exitcodes.PREEMPTED


def test_a_joined_stop_never_requeues():
    run = Run(slurm=SlurmConfig(requeue=True))
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.STOPPING, step=6, exit_code=exitcodes.PREEMPTED)
    run.send(act.Rescanned(emergency=(6, WALL + run.now)))
    assert not of(run.exit(code=exitcodes.PREEMPTED), act.Requeue)


def test_requeue_after_a_signal_stop_with_a_checkpoint():
    run = Run(slurm=SlurmConfig(requeue=True))
    run.start()
    peer = run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    run.msg(peer, protocol.SAVED, step=1, kind="emergency", path="/ck/step-1")
    assert of(run.exit(code=exitcodes.PREEMPTED), act.Requeue) == [act.Requeue()]


def test_ckptd_stop_waits_for_the_end_and_is_never_requeued():
    run = Run(slurm=SlurmConfig(requeue=True))
    run.start()
    peer = run.connect()
    client, out = run.client(protocol.STOP, wait=True)
    assert sends(out, protocol.ACCEPTED)[0].close is False and client.waiting
    run.msg(peer, protocol.SAVED, step=1, kind="emergency", path="/ck/step-1")
    out = run.exit(code=exitcodes.PREEMPTED)
    assert not of(out, act.Requeue)
    stopped = sends(run.core.finish(linger=0.0), protocol.STOPPED)
    assert stopped[0].peer is client and stopped[0].fields["exit_code"] == exitcodes.PREEMPTED


def test_a_client_that_goes_away_is_not_answered():
    run = Run()
    run.start()
    client, _ = run.client(protocol.STOP, wait=True)
    run.send(act.PeerClosed(client))
    assert not run.core.finish(linger=0.0)


# --- hangs --------------------------------------------------------------------------------------------


def test_a_silent_trainer_is_a_hang_stacks_sigterm_then_sigkill_after_the_hang_grace_and_a_restart():
    run = Run(hang_timeout=30.0, hang_grace=4.0, grace=25.0)
    run.start()
    silent, busy = run.connect(rank=0), run.connect(rank=1, stack_signal=None)
    run.msg(silent, protocol.HEARTBEAT, step=1)
    run.now += 20
    run.msg(busy, protocol.HEARTBEAT, step=1)
    assert not of(run.advance(9.9), act.DumpStacks)
    out = run.advance(0.1)
    dump = of(out, act.DumpStacks)[0]
    assert dump.hung == (silent,) and dump.dumped == (silent, busy) and dump.asked == (silent,)
    assert dump.due == run.now + 1.0
    assert of(out, act.SignalChild) == [act.SignalChild(signal.SIGTERM)]
    assert record(out, "hang").fields["pids"] == [silent.pid]
    assert run.state is S.STOPPING and run.led.life.deadline == run.now + 4.0  # not the preemption grace
    assert of(run.advance(4.0), act.Kill) == [act.Kill("the hang grace ran out")]
    out = run.exit(sig=signal.SIGKILL)
    assert record(out, "exit").fields["reason"] == "hang" and run.state is S.BACKOFF


def test_a_hang_while_stopping_is_left_to_the_stop_grace():
    run = Run(hang_timeout=5.0, grace=20.0)
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=1)
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.advance(19.0)  # silent far beyond hang_timeout while writing its emergency checkpoint
    assert not of(out, act.DumpStacks) and not of(out, act.Kill)
    out = run.advance(1.0)
    assert of(out, act.Kill) == [act.Kill("the grace period ran out")]


def test_a_stop_during_a_hang_does_not_send_stop_again():
    run = Run(hang_timeout=5.0)
    run.start()
    run.connect()
    run.advance(5.0)
    assert run.led.life.hang
    out = run.send(act.SignalReceived(signal.SIGTERM))
    assert not sends(out, protocol.STOP)
    late = Peer(98, None, 1, run.now, role="trainer", pid=1)  # type: ignore[arg-type]
    assert not sends(run.send(act.TrainerMessage(late, {"type": protocol.HELLO})), protocol.STOP)


def test_no_hang_without_hang_timeout():
    run = Run()
    run.start()
    run.connect()
    assert run.core.next_due(run.view()) is None
    assert not of(run.advance(10_000), act.DumpStacks)


# --- notices ------------------------------------------------------------------------------------------


def test_a_notice_stop_uses_the_platforms_deadline_and_acknowledges_once_committed():
    run = Run()
    run.start()
    peer = run.connect()
    run.msg(peer, protocol.HEARTBEAT, step=2)
    out = run.send(act.NoticeReceived(notice(deadline_in=12.0, event_id="ev-1")))
    stop = sends(out, protocol.STOP)[0]
    assert stop.fields["deadline"] == pytest.approx(WALL + run.now + 12.0)
    assert not of(out, act.Acknowledge)  # not before the checkpoint is durable
    out = run.send(act.NoticeReceived(notice(deadline_in=12.0, event_id="ev-2")))  # a second notice joins
    assert not sends(out, protocol.STOP) and not of(out, act.Acknowledge)
    out = run.msg(peer, protocol.SAVED, step=2, kind="emergency", path="/ck/step-2")
    assert of(out, act.Acknowledge) == [act.Acknowledge("ev-1"), act.Acknowledge("ev-2")]
    out = run.exit(code=exitcodes.PREEMPTED)
    assert not of(out, act.Acknowledge)  # each event once
    assert record(out, "notice_result").fields["before_deadline"] is True


def test_a_notice_checkpoint_asks_a_save_and_acknowledges_after_it():
    run = Run()
    run.start()
    peer = run.connect()
    out = run.send(act.NoticeReceived(notice(action="checkpoint", event_id="ev-9")))
    save = sends(out, protocol.SAVE)[0]
    assert save.fields["wait"] is True and run.state is S.RUNNING
    out = run.msg(peer, protocol.SAVED, step=3, kind="manual", path="/ck/step-3",
                  request_ids=[save.fields["request_id"]])
    assert of(out, act.Acknowledge) == [act.Acknowledge("ev-9")]
    assert not of(out, act.Pin)  # not asked for by a person


def test_a_notice_checkpoint_with_no_trainer_is_acknowledged_at_once():
    run = Run()
    run.start()
    out = run.send(act.NoticeReceived(notice(action="checkpoint", event_id="ev-3")))
    assert of(out, act.Acknowledge) == [act.Acknowledge("ev-3")]
    assert "skipped" in of(out, act.Log)[0].msg


def test_a_log_notice_changes_nothing():
    run = Run()
    run.start()
    run.connect()
    out = run.send(act.NoticeReceived(notice(action="log")))
    assert events(out) == ["notice"] and run.state is S.RUNNING and run.led.stop is None


# --- requests and messages ----------------------------------------------------------------------------


def test_sigusr1_asks_a_save_and_pins_what_it_produces():
    run = Run()
    run.start()
    peer = run.connect()
    out = run.send(act.SignalReceived(signal.SIGUSR1))
    request_id = sends(out, protocol.SAVE)[0].fields["request_id"]
    out = run.msg(peer, protocol.SAVED, step=4, kind="manual", path="/ck/step-4/", request_id=request_id)
    assert of(out, act.Pin) == [act.Pin("step-4")]
    committed = of(out, act.Committed)[0]
    assert committed.name == "step-4" and committed.record.fields["step"] == 4


def test_ckptd_save_with_no_trainer_is_refused_with_an_error():
    run = Run()
    run.start()
    _, out = run.client(protocol.SAVE)
    error = sends(out, protocol.ERROR)[0]
    assert error.close and "no trainer is connected" in error.fields["error"]


def test_a_scheduled_save_during_a_stop_is_skipped():
    run = Run()
    run.start()
    run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    out = run.send(act.ScheduledSave("every 60s"))
    assert not sends(out, protocol.SAVE) and "the trainer is stopping" in of(out, act.Log)[0].msg


def test_an_unknown_message_is_answered_with_an_error():
    run = Run()
    run.start()
    peer = run.connect()
    out = run.msg(peer, "save")  # a client's message from a trainer
    assert "unexpected 'save' from a trainer" in sends(out, protocol.ERROR)[0].fields["error"]


def test_sighup_asks_for_a_reload():
    run = Run()
    run.start()
    assert of(run.send(act.SignalReceived(signal.SIGHUP)), act.Reload) == [act.Reload()]


def test_pruning_announcements_are_bounded():
    run = Run()
    run.start()
    peer = run.connect()
    out = run.msg(peer, protocol.PRUNING, names=["step-1", "", "x" * 300, 5, *[f"step-{i}" for i in range(2000)]])
    names = of(out, act.Prune)[0].names
    assert names[0] == "step-1" and "" not in names and len(names) <= 1024


def test_an_emergency_checkpoint_appearing_on_disk_confirms_the_stop():
    run = Run()
    run.start()
    run.connect()
    run.send(act.SignalReceived(signal.SIGTERM))
    old = ("step-1", 1, "emergency", WALL + run.now - 60)  # from an earlier stop: not this one
    run.send(act.Rescanned(added=(old,)))
    assert not run.led.stop.confirmed
    out = run.send(act.Rescanned(added=(("step-2", 2, "emergency", WALL + run.now),),
                                 latest=("step-2", 2, "emergency", WALL + run.now)))
    assert run.led.stop.confirmed and run.led.last_checkpoint["name"] == "step-2" and of(out, act.SaveState)
    assert exit_code(run.exit(code=1)) == exitcodes.PREEMPTED


# --- every state, every event -------------------------------------------------------------------------


def _random_event(run: Run, rng: random.Random) -> act.Event:
    peer = run.trainers[0] if run.trainers else Peer(1, None, 1, run.now, role="trainer", pid=1)  # type: ignore
    choices = [
        lambda: act.Timer(),
        lambda: act.SignalReceived(rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP])),
        lambda: act.NoticeReceived(notice(rng.choice(["stop", "checkpoint", "log"]), event_id=rng.choice([None, "e"]))),
        lambda: act.ScheduledSave("cron"),
        lambda: act.TrainerMessage(peer, {"type": rng.choice([protocol.HELLO, protocol.HEARTBEAT, protocol.SAVED,
                                                               protocol.STOPPING, protocol.SAVE_FAILED]),
                                          "step": rng.randrange(5), "kind": rng.choice(["emergency", "periodic"]),
                                          "exit_code": rng.choice([0, 85, 86]), "path": "/ck/step-1"}),
        lambda: act.ControlRequest(Peer(2, None, 2, run.now, role="client"),  # type: ignore[arg-type]
                                   {"type": rng.choice([protocol.SAVE, protocol.STOP, protocol.STATUS]),
                                    "wait": rng.random() < 0.5}),
        lambda: act.ChildExited(ExitStatus(run.pid, code=rng.choice([0, 1, 85, 86]))),
        lambda: act.Rescanned(emergency=(1, WALL + run.now)),
    ]
    return rng.choice(choices)()


@pytest.mark.parametrize("seed", range(40))
def test_any_order_of_events_keeps_the_state_machine_legal(seed):
    """Random orders of every kind of event: no illegal transition, the run ends once, nothing starts after."""
    rng = random.Random(seed)
    run = Run(hang_timeout=3.0, grace=5.0, max_restarts=4)
    run.start()
    seen, ended = {run.state}, 0
    for _ in range(200):
        run.now += rng.choice([0.0, 0.5, 2.0, 6.0])
        if run.state is S.RUNNING and not run.trainers and rng.random() < 0.3:
            run.connect()
        event = _random_event(run, rng)
        if isinstance(event, act.ChildExited) and run.led.life is None:
            continue  # no child to exit
        out = run.send(event)
        for spawn in of(out, act.Spawn):
            assert not run.core.terminal, "a spawn after the end"
            run.spawned() if rng.random() < 0.9 else run.send(act.SpawnFailed("e", "cannot start"))
            assert spawn.restarts == run.led.restarts
        if isinstance(event, act.ChildExited):
            run.trainers.clear()
        ended += len(of(out, act.Exit))
        seen.add(run.state)
        if run.core.terminal:
            break
    assert ended == (1 if run.core.terminal else 0)
    assert run.core.terminal or run.state in (S.RUNNING, S.STOPPING, S.KILLING, S.BACKOFF)


def test_every_state_is_reached():
    """IDLE, RUNNING, BACKOFF, STOPPING, KILLING, EXITED and FATAL, each by its own path above; here in one
    table, so a state added to states.py without a path through the core fails."""
    reached = set()
    run = Run(grace=1.0, max_restarts=1)
    reached.add(run.state)
    run.start()
    reached.add(run.state)
    run.exit(code=1)
    reached.add(run.state)
    run.advance(60)
    run.spawned()
    run.send(act.SignalReceived(signal.SIGTERM))
    reached.add(run.state)
    run.advance(1.0)
    reached.add(run.state)
    run.exit(sig=signal.SIGKILL)
    reached.add(run.state)
    crash = Run(max_restarts=0)
    crash.start()
    crash.exit(code=1)
    reached.add(crash.state)
    assert reached == set(S)
