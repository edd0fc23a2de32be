"""Checkpointer behaviour: async saves, buffer reuse, coalescing, env contract, control channel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import ckptd
from ckptd import env, exitcodes, protocol, store
from conftest import small_model, train_steps, wait_for

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes


def big_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 2048))  # 64 MiB


def test_async_save_returns_before_durable_and_reuses_buffers(tmp_path):
    model = big_model()
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    results = []
    for s in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.fill_(s)
        ck.step(s)
        res = ck.save()
        model[0].weight.data.fill_(-1)  # training goes on: the snapshot must not see this
        results.append(res.wait())
    ck.close()
    assert [r.error for r in results] == [None, None, None]
    assert ck._snapshot.allocations == 1  # one buffer, reused
    for s in (1, 2, 3):
        w = ckptd.load_state(os.path.join(tmp_path, store.checkpoint_name(s)))["model"]["0.weight"]
        assert torch.all(w == s)


def test_periodic_save_is_coalesced_while_one_is_in_flight_and_manual_waits(tmp_path):
    model = big_model()
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), every_steps=1, handle_signals=False, save_on_close=False)
    first = ck.step(1)
    assert first is not None and not first.skipped
    second = ck.step(2)  # steps are instant; the 64 MiB persist is not
    assert second is not None and second.skipped == "a save is already in flight"
    assert ck.stats["coalesced"] >= 1
    manual = ck.save(kind="manual")  # waits for the one in flight, then saves
    assert first.done() and manual.wait().error is None
    ck.close()
    assert [i.step for i in store.list_checkpoints(str(tmp_path))] == [1, 2]


def test_close_flushes_and_writes_final(tmp_path):
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), every_steps=5, handle_signals=False)
    for s in range(1, 8):
        ck.step(s)
    ck.close()
    assert [(i.step, i.kind) for i in store.list_checkpoints(str(tmp_path))] == [(5, "periodic"), (7, "final")]


def test_context_manager_skips_final_on_exception(tmp_path):
    model, _ = small_model()
    with pytest.raises(RuntimeError):
        with ckptd.Checkpointer(model=model, dir=str(tmp_path), handle_signals=False) as ck:
            ck.step(3)
            raise RuntimeError("step failed")
    assert store.list_checkpoints(str(tmp_path)) == []


def test_every_seconds(tmp_path):
    model, _ = small_model()
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), every_seconds=0.05, handle_signals=False,
                            save_on_close=False, async_save=False)
    s = 0

    def saved():
        nonlocal s
        s += 1
        ck.step(s)
        return store.list_checkpoints(str(tmp_path))

    wait_for(saved, timeout=10, interval=0.01, what="a time-based save")
    ck.close()


def test_environment_from_ckptd_run_sets_dir_and_overrides_policy(tmp_path, monkeypatch):
    monkeypatch.setenv(env.DIR, str(tmp_path / "from-env"))
    monkeypatch.setenv(env.EVERY_STEPS, "2")
    model, _ = small_model()
    ck = ckptd.Checkpointer(model=model, every_steps=1000, handle_signals=False, async_save=False, save_on_close=False)
    assert ck.dir == str(tmp_path / "from-env") and ck.every_steps == 2
    ck.step(1)
    ck.step(2)
    ck.close()
    assert [i.step for i in store.list_checkpoints(str(tmp_path / "from-env"))] == [2]
    monkeypatch.setenv(env.EVERY_STEPS, "often")
    with pytest.raises(ckptd.ConfigError, match="CKPTD_EVERY_STEPS"):
        ckptd.Checkpointer(model=model, handle_signals=False)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ckptd.CkptdError, match="every_steps must be > 0"):
        ckptd.Checkpointer(dir=str(tmp_path), every_steps=0)
    ck = ckptd.Checkpointer(dir=str(tmp_path), handle_signals=False)
    with pytest.raises(ckptd.CkptdError, match="number of completed steps"):
        ck.step(-1)
    with pytest.raises(ckptd.CkptdError, match="nothing to save yet"):
        ck.save()
    ck.close()


class FakeSupervisor:
    """A real unix socket server speaking the control protocol (the supervisor's side, in a thread)."""

    def __init__(self, path: str) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.messages: list[dict] = []
        self.conn: socket.socket | None = None
        self.ended = False  # the trainer's end of the connection closed (EOF)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.conn, _ = self.srv.accept()
        dec = protocol.LineDecoder()
        while data := self.conn.recv(65536):
            self.messages.extend(dec.feed(data))
        self.ended = True

    def send(self, **msg) -> None:
        self.conn.sendall(protocol.encode(msg))

    def got(self, type_: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == type_]


def test_control_channel_save_and_stop_requests(tmp_path, monkeypatch):
    sock = str(tmp_path / "c.sock")
    sup = FakeSupervisor(sock)
    monkeypatch.setenv(env.CONTROL, sock)
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path / "ck"), handle_signals=False)
    wait_for(lambda: sup.got("hello"), what="hello")
    assert sup.got("hello")[0]["role"] == "trainer" and sup.got("hello")[0]["pid"] == os.getpid()
    ck.step(1)
    wait_for(lambda: sup.got("heartbeat"), what="heartbeat")
    sup.send(type="save", request_id="r1", kind="manual")
    wait_for(lambda: ck.channel.peek_stop().save, what="request received while 'training'")
    ck.step(2).wait()
    wait_for(lambda: sup.got("saved"), what="saved")
    saved = sup.got("saved")[0]
    assert saved["request_id"] == "r1" and saved["step"] == 2 and saved["kind"] == "manual"
    sup.send(type="stop", request_id="r2", deadline=time.time() + 60, reason="test")
    wait_for(lambda: ck.channel.peek_stop().stop, what="stop received")
    with pytest.raises(SystemExit) as exc:
        ck.step(3)
    assert exc.value.code == exitcodes.PREEMPTED
    wait_for(lambda: sup.got("stopping"), what="stopping")
    assert sup.got("stopping")[0] == {"type": "stopping", "step": 3, "exit_code": 85, "reason": None}
    infos = store.list_checkpoints(str(tmp_path / "ck"))
    assert [(i.step, i.kind) for i in infos] == [(2, "manual"), (3, "emergency")]
    assert [m["kind"] for m in sup.got("saved")] == ["manual", "emergency"]


def test_close_ends_the_connection_at_once_while_the_process_lives_on(tmp_path, monkeypatch):
    # The channel's reader thread sits in recv(): a plain close() of the socket sent no end while it did, so
    # the supervisor went on watching a trainer that had closed (and killed its slow exit as a hang).
    sock = str(tmp_path / "c.sock")
    sup = FakeSupervisor(sock)
    monkeypatch.setenv(env.CONTROL, sock)
    ck = ckptd.Checkpointer(dir=str(tmp_path / "ck"), handle_signals=False, save_on_close=False)
    wait_for(lambda: sup.got("hello"), what="hello")
    ck.step(1)
    ck.close()
    wait_for(lambda: sup.ended, timeout=10, what="the supervisor's end to see the connection closed")


def test_a_save_request_somebody_waits_for_is_not_paced_one_nobody_waits_for_is(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "DIRECT_CHUNK", 1 << 20)
    sock = str(tmp_path / "c.sock")
    sup = FakeSupervisor(sock)
    monkeypatch.setenv(env.CONTROL, sock)
    ck = ckptd.Checkpointer(model=big_model(), dir=str(tmp_path / "ck"), pace=100, handle_signals=False,
                            save_on_close=False)
    wait_for(lambda: sup.got("hello"), what="hello")
    sup.send(type="save", request_id="w", kind="manual", wait=True)  # `ckptd save --wait`
    wait_for(lambda: ck.channel.peek_stop().save, what="the save request")
    waited = ck.step(1)
    assert waited is not None and waited.wait().error is None and waited.paused_seconds == 0
    sup.send(type="save", request_id="n", kind="manual", wait=False)  # `ckptd save`
    wait_for(lambda: ck.channel.peek_stop().save, what="the second save request")
    background = ck.step(2)
    wait_for(lambda: background.paused_seconds > 0, timeout=30, what="the unwaited save pausing")
    ck.close()
    assert [m["paused_seconds"] == 0 for m in sup.got("saved")] == [True, False]


def test_heartbeat_only_beats_and_leaves_a_pending_stop_to_the_next_step(tmp_path, monkeypatch):
    """heartbeat(): nothing before the first step; after it, a heartbeat of the last step, and never the emergency
    checkpoint (it would hold weights newer than that step): the stop waits for the next step()."""
    sock = str(tmp_path / "c.sock")
    sup = FakeSupervisor(sock)
    monkeypatch.setenv(env.CONTROL, sock)
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path / "ck"), handle_signals=False)
    wait_for(lambda: sup.got("hello"), what="hello")
    ck.heartbeat()
    ck.step(1)
    wait_for(lambda: sup.got("heartbeat"), what="the step's heartbeat")
    ck._last_heartbeat = 0.0  # as if a second had passed since step()'s heartbeat
    sup.send(type="stop", request_id="r1", deadline=time.time() + 60, reason="test")
    wait_for(lambda: ck.channel.peek_stop().stop, what="stop received")
    ck.heartbeat()
    wait_for(lambda: len(sup.got("heartbeat")) == 2, what="heartbeat()'s heartbeat")
    assert [m["step"] for m in sup.got("heartbeat")] == [1, 1]
    assert not os.path.isdir(tmp_path / "ck") and not sup.got("stopping")
    with pytest.raises(SystemExit) as exc:
        ck.step(2)
    assert exc.value.code == exitcodes.PREEMPTED
    assert [(i.step, i.kind) for i in store.list_checkpoints(str(tmp_path / "ck"))] == [(2, "emergency")]


def test_channel_absent_supervisor_does_not_stop_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(env.CONTROL, str(tmp_path / "nobody.sock"))
    import ckptd.channel as channel

    monkeypatch.setattr(channel.time, "monotonic", iter([0.0, 100.0, 200.0]).__next__)
    with caplog.at_level("WARNING", logger="ckptd"):
        ck = ckptd.Checkpointer(dir=str(tmp_path), handle_signals=False)
    assert ck.channel is None and "cannot reach the supervisor" in caplog.text


def test_scheduler_scaler_rng_and_epoch_round_trip(tmp_path):
    import random

    import numpy as np

    model, opt = small_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        sched.step()
    scaler.scale(torch.ones(1))  # initialise the scale tensor
    scaler.update(512.0)
    # save_on_close=False: close() would save the RNG streams the draws below advanced (the state at close)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, scaler=scaler, dir=str(tmp_path),
                            handle_signals=False, save_on_close=False)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ck.step(5, epoch=2)
    ck.save(block=True)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    ck.close()

    model2, opt2 = small_model(seed=3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    scaler2 = torch.amp.GradScaler("cpu")
    ck2 = ckptd.Checkpointer(model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2, dir=str(tmp_path),
                             handle_signals=False)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert ck2.restore() == 5 and ck2.epoch == 2
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == 512.0
    ck2.close()


def test_background_persist_is_paced_until_somebody_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "DIRECT_CHUNK", 1 << 20)  # 64 write requests, each followed by a pause
    model = big_model()
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), pace=100, handle_signals=False, save_on_close=False)
    ck.step(1)
    res = ck.save()
    wait_for(lambda: res.paused_seconds > 0, timeout=30, what="the writer pausing after a request")
    assert not res.done()  # 63 more requests, each paused 100 x its own time
    res.wait()  # somebody waits: the remaining requests go without pauses
    assert res.error is None and store.inspect_checkpoint(res.path).valid
    ck.pace = 0  # full speed: no pause at all
    ck.step(2)
    full = ck.save().wait()
    assert full.error is None and full.paused_seconds == 0
    ck.close()


@pytest.mark.kind("system")
def test_a_script_that_ends_without_close_finishes_its_save_without_pauses(tmp_path):
    code = f"""
import atexit, torch, ckptd
from ckptd import store
store.DIRECT_CHUNK = 1 << 20
model = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 2048))
ck = ckptd.Checkpointer(model=model, dir={str(tmp_path)!r}, pace=100, handle_signals=False, save_on_close=False)
ck.step(1)
res = ck.save()
atexit.register(lambda: print("PAUSED", res.paused_seconds, "WRITING", res.persist_seconds - res.paused_seconds))
"""  # the script ends here: no close(), no wait()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    _, paused, _, writing = out.split()
    # paced all the way, the pauses would add up to ~100 x the writing time; once the main thread is
    # gone the writer pauses no more (at most the pause under way when it ended)
    assert float(paused) < 10 * float(writing)
    assert store.inspect_checkpoint(os.path.join(tmp_path, store.checkpoint_name(1))).valid


def test_a_paused_writer_resumes_at_once_when_the_save_is_waited_for(tmp_path):
    ck = ckptd.Checkpointer(dir=str(tmp_path), pace=2.0, handle_signals=False)
    res = ckptd.SaveResult(step=1, kind="manual")
    pause = ck._pacer(res)
    assert pause is not None
    t = threading.Thread(target=pause, args=(1000.0,))  # would pause 2000 s
    t.start()
    res.wait()  # no persist behind this result: only tells the pause to end
    t.join(timeout=30)
    assert not t.is_alive()
    ck.pace = 0
    assert ck._pacer(res) is None
    with pytest.raises(ckptd.CkptdError, match="pace must be a number from 0"):
        ckptd.Checkpointer(dir=str(tmp_path), pace=-1)
    ck.close()


def test_snapshot_copies_every_kind_of_tensor_exactly(tmp_path):
    torch.manual_seed(0)
    model = big_model()  # 64 MiB: the multi-threaded copy
    model.register_buffer("transposed", torch.randn(300, 700).t())  # not contiguous: copied with copy_
    model.register_buffer("bf16", torch.randn(1001).to(torch.bfloat16))  # odd byte sizes
    model.register_buffer("flags", torch.rand(333) > 0.5)
    model.register_buffer("counts", torch.randint(-9, 9, (77,), dtype=torch.int16))
    model.register_buffer("empty", torch.empty(0, 5))
    assert not model.transposed.is_contiguous()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ck = ckptd.Checkpointer(model=model, dir=str(tmp_path), handle_signals=False, save_on_close=False)
    ck.step(1)
    res = ck.save()
    for v in model.state_dict().values():
        if v.numel():
            v.zero_() if v.dtype != torch.bool else v.fill_(False)  # the loop goes on
    assert res.wait().error is None
    ck.close()
    saved = ckptd.load_state(os.path.join(tmp_path, store.checkpoint_name(1)))["model"]
    assert set(saved) == set(expected)
    for k, v in expected.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k], v), k


def test_close_saves_the_state_changed_after_the_last_saved_step_and_nothing_when_it_did_not(tmp_path):
    model, opt = small_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    ck = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, dir=str(tmp_path), handle_signals=False)
    train_steps(model, opt, 2)
    ck.step(2)
    ck.save(block=True, kind="periodic")
    sched.step()  # the end of an epoch, after its last step was saved
    ck.close()
    (info,) = ckptd.list_checkpoints(str(tmp_path))
    assert info.step == 2 and info.kind == "final"  # replaced in one rename: still one checkpoint of step 2
    assert ckptd.load_state(info.path)["scheduler"]["last_epoch"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the replaced one is gone

    ck2 = ckptd.Checkpointer(model=model, optimizer=opt, scheduler=sched, dir=str(tmp_path), handle_signals=False)
    assert ck2.restore() == 2
    before = os.stat(info.path).st_ino
    ck2.close()  # nothing changed since the restore: nothing written
    assert os.stat(info.path).st_ino == before and ckptd.list_checkpoints(str(tmp_path))[0].kind == "final"


def test_the_first_step_after_a_resume_that_skips_steps_is_reported(tmp_path, caplog):
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), handle_signals=False)
    ck.step(4)
    ck.close()
    ck2 = ckptd.Checkpointer(model=model, optimizer=opt, dir=str(tmp_path), handle_signals=False)
    assert ck2.restore() == 4
    with caplog.at_level("WARNING", logger="ckptd"):
        ck2.step(9)
        ck2.step(11)  # only the first step after the resume is compared
    jumps = [r.getMessage() for r in caplog.records if "did not run" in r.getMessage()]
    assert len(jumps) == 1 and "resuming from step 4 is step 9: steps 5..8" in jumps[0], jumps
    ck2.close()


def test_the_recorded_numpy_state_follows_every_change_of_numpy_s_global_rng():
    import numpy as np

    from ckptd.state import capture_rng

    def same(a, b):
        return a[0] == b[0] and (a[1] == b[1]).all() and a[2:] == b[2:]

    for change in (np.random.rand, lambda: np.random.seed(5), np.random.standard_normal, lambda: None,
                   np.random.standard_normal, lambda: np.random.set_state(np.random.get_state())):
        change()
        assert same(capture_rng()["numpy"], np.random.get_state())
    from ckptd.state import restore_rng

    capture_rng()
    words = list(np.random.get_state())
    words[3], words[4] = 1, 0.5  # the same words, another Gaussian cache: only a restore can do that unnoticed
    restore_rng({"numpy": words})
    assert same(capture_rng()["numpy"], np.random.get_state())


def test_a_script_that_only_restores_and_closes_leaves_the_runs_checkpoints_as_they_are(make_checkpoints):
    # An evaluation script (or a checker) builds a Checkpointer over a live run's directory, restores, draws
    # from the RNG while it evaluates, and closes: no step was trained here, so close() must neither save a
    # "final" state over the run's newest checkpoint nor mark the run finished.
    import ckptd
    from ckptd import store

    root = make_checkpoints([5, 10])
    newest = os.path.join(root, "step-000000000010")
    store.amend_manifest(newest, finished=False)  # a live run: its newest checkpoint is not its end
    with open(os.path.join(newest, "manifest.json"), "rb") as f:
        before = f.read()
    model, opt = small_model()
    ck = ckptd.Checkpointer(model=model, optimizer=opt, dir=root, handle_signals=False)  # save_on_close: default
    assert ck.restore() == 10
    torch.rand(8)  # evaluation advances the global RNG
    ck.close()
    with open(os.path.join(newest, "manifest.json"), "rb") as f:
        assert f.read() == before
    infos = store.list_checkpoints(root)
    assert [i.step for i in infos] == [5, 10] and not any(i.finished for i in infos)
