"""supervisor/metrics.py: every metric, goodput on a scripted run with a known answer, fixed label sets,
the endpoint (/metrics, /healthz; nothing else to other users) with its bounds against slow clients, and the
file_sd entry. Fake clock, fresh registries, no sleeping."""

from __future__ import annotations

import json
import os
import socket
import time

import psutil
import pytest
from prometheus_client import CollectorRegistry

from ckptd.supervisor import metrics as metricsmod
from ckptd.supervisor.clock import FakeClock
from ckptd.supervisor.metrics import MetricsServer, RunMetrics

pytestmark = pytest.mark.kind("unit")


def fresh(latest=lambda: None, carried=None):
    clock = FakeClock()
    reg = CollectorRegistry()
    return clock, reg, RunMetrics(reg, clock, latest_step=latest, carried=carried)


def value(reg, metric, **labels):
    return reg.get_sample_value(metric, labels)


def series(reg) -> set[tuple]:
    return {(s.name, tuple(sorted(s.labels.items()))) for m in reg.collect() for s in m.samples}


def test_goodput_of_a_scripted_run_with_a_crash_and_a_restart_is_the_known_answer():
    """Life 1: ready at t=1, steps 1..100 every 0.1 s (to t=11), a 0.5 s save stall at step 50 (the newest
    checkpoint), crash at step 100: 50 steps lost. Life 2 (restart at t=12): ready (restored step 50) at t=14,
    steps 51..150 every 0.1 s (to t=24), finished at t=24.5. Productive: (10 - 0.5) x 50/100 + 10 x 100/100."""
    latest = {"step": None}
    clock, reg, m = fresh(latest=lambda: latest["step"])
    m.on_event("spawn", {"pid": 1})
    clock.advance(1)
    m.trainer_connected()
    for step in range(1, 101):
        clock.advance(0.1)
        m.step(step)
        if step == 50:
            m.saved({"kind": "periodic", "step": 50, "stall_seconds": 0.5, "seconds": 0.75, "bytes": 4096}, "step-50")
            m.on_event("checkpoint", {"kind": "periodic", "step": 50, "bytes": 4096})
            latest["step"] = 50
    m.on_event("exit", {"reason": "error", "step": 100})
    clock.advance(1)
    m.on_event("restart", {"reason": "error", "resume_step": 50, "lost_steps": 50})
    clock.advance(1)
    m.trainer_connected()
    clock.advance(1)
    m.restored(50, 0.25)
    for step in range(51, 151):
        clock.advance(0.1)
        m.step(step)
    clock.advance(0.5)
    m.on_event("exit", {"reason": "finished", "step": 150})

    expected = ((10 - 0.5) * 50 / 100 + 10.0) / 24.5
    assert value(reg, "ckptd_goodput_ratio") == pytest.approx(expected, abs=1e-9)
    assert value(reg, "ckptd_steps_total") == 200  # 50 of them recomputed
    assert value(reg, "ckptd_lost_steps_total") == 50
    assert value(reg, "ckptd_restarts_total", reason="error") == 1
    assert value(reg, "ckptd_restore_seconds") == 0.25
    assert value(reg, "ckptd_checkpoint_stall_seconds_sum") == 0.5
    assert value(reg, "ckptd_checkpoint_duration_seconds_sum") == 0.75
    assert value(reg, "ckptd_checkpoint_bytes") == 4096
    assert value(reg, "ckptd_checkpoints_total", kind="periodic", result="ok") == 1
    # The figures carry over to the next `ckptd run` of the same run (state.json): same answer there.
    carried = m.goodput.carry(clock.monotonic())
    assert carried == {"wall_seconds": 24.5, "productive_seconds": round(expected * 24.5, 3)}
    clock2, reg2, m2 = fresh(carried=carried)
    assert value(reg2, "ckptd_goodput_ratio") == pytest.approx(expected, abs=1e-4)
    clock2.advance(24.5)  # a second invocation that trains nothing halves it
    assert value(reg2, "ckptd_goodput_ratio") == pytest.approx(expected / 2, abs=1e-4)


def test_goodput_counts_the_current_life_as_kept_until_it_loses_steps():
    latest = {"step": 0}
    clock, reg, m = fresh(latest=lambda: latest["step"])
    m.on_event("spawn", {})
    clock.advance(2)  # startup earns nothing
    m.trainer_connected()
    for step in range(1, 9):
        clock.advance(1)
        m.step(step)
    assert value(reg, "ckptd_goodput_ratio") == pytest.approx(8 / 10)
    m.on_event("exit", {"reason": "signal", "step": 8})  # no checkpoint beyond step 0: all 8 steps lost
    assert value(reg, "ckptd_goodput_ratio") == 0
    assert value(reg, "ckptd_lost_steps_total") == 8


def test_goodput_stops_moving_when_training_ends_so_the_linger_serves_the_final_figure():
    """After the run ends, `ckptd run` may serve its final state for `metrics.linger` seconds: the ratio (served,
    in `status`, carried in state.json) is the run's at its end, not one that falls while nothing trains."""
    clock, reg, m = fresh(latest=lambda: 10)
    m.on_event("spawn", {})
    clock.advance(1)
    m.trainer_connected()
    for step in range(1, 11):
        clock.advance(1)
        m.step(step)
    m.on_event("exit", {"reason": "finished", "step": 10})
    m.training_ended()
    final = value(reg, "ckptd_goodput_ratio")
    assert final == pytest.approx(10 / 11)
    clock.advance(30)  # the linger
    assert value(reg, "ckptd_goodput_ratio") == final
    assert m.status()["goodput_ratio"] == round(final, 4)
    assert m.goodput.carry(clock.monotonic()) == {"wall_seconds": 11.0, "productive_seconds": 10.0}


def test_a_restore_older_than_the_newest_checkpoint_counts_the_steps_between_as_lost():
    """Life 1: ready at t=0, steps 1..100 every 0.1 s, checkpoints at 50 and 100, killed right after step
    100: 0 steps lost by the newest checkpoint. But checkpoint 100 does not verify and life 2 restores 50:
    50 more steps lost, and life 1's 10 s of training count half."""
    latest = {"step": 100}
    clock, reg, m = fresh(latest=lambda: latest["step"])
    m.on_event("spawn", {})
    m.trainer_connected()
    for step in range(1, 101):
        clock.advance(0.1)
        m.step(step)
    m.on_event("exit", {"reason": "signal", "step": 100})
    assert value(reg, "ckptd_lost_steps_total") == 0
    m.on_event("restart", {"reason": "signal", "resume_step": 100, "lost_steps": 0})
    clock.advance(10)
    m.restored(50, 0.1)
    m.on_event("resumed", {"step": 50, "expected_step": 100, "more_lost_steps": 50})
    assert value(reg, "ckptd_lost_steps_total") == 50
    assert value(reg, "ckptd_goodput_ratio") == pytest.approx(10 * 50 / 100 / 20)


def test_every_labelled_series_exists_from_the_start_and_their_number_never_changes():
    latest = {"step": None}
    clock, reg, m = fresh(latest=lambda: latest["step"])
    m.train_metrics({"loss": 0.5, "lr": 1e-3})
    before = series(reg)
    assert ("ckptd_checkpoint_failures_total", (("reason", "deadline"),)) in before
    assert ("ckptd_preemption_notices_total", (("source", "gcp"),)) in before
    events = [("spawn", {}), ("checkpoint", {"kind": "emergency", "step": 3}),
              ("save_failed", {"kind": "periodic", "errno": 28}), ("notice", {"source": "aws"}),
              ("notice_result", {"margin_seconds": -1.5}), ("hang", {}), ("kill", {}),
              ("exit", {"reason": "hang", "step": 9}), ("restart", {"reason": "hang"}),
              ("checkpoint", {"kind": "a-path/../x", "step": 7}), ("restart", {"reason": "made-up"}),
              ("give_up", {}), ("end", {"exit_code": 70})]
    for event, fields in events:
        m.on_event(event, fields)
        m.step(5)
        m.train_metrics({"loss": 0.25, "lr": 1e-4})
        for state in ("running", "stopping", "backoff", "exited", "fatal", "killing", "idle"):
            m.publish(state=state, stopping=False, exit_code=1, step=5,
                      last_checkpoint={"name": "step-7", "step": 7, "kind": "manual", "time": 1.0}, valid=3)
    m.signal_notice("signal")
    assert series(reg) == before
    assert value(reg, "ckptd_checkpoint_failures_total", reason="no_space") == 1
    assert value(reg, "ckptd_checkpoint_failures_total", reason="deadline") == 1  # once per stop
    assert value(reg, "ckptd_restarts_total", reason="error") == 1  # an unknown reason lands in a fixed label
    assert value(reg, "ckptd_checkpoints_total", kind="manual", result="ok") == 1
    assert value(reg, "ckptd_emergency_checkpoint_margin_seconds") == -1.5


def test_train_metrics_keep_a_fixed_set_of_names():
    clock, reg, m = fresh()
    m.train_metrics({f"m{i}": float(i) for i in range(40)} | {"bad name{}": 1.0, "nan": float("nan"), "b": True})
    names = {s.labels["name"] for mm in reg.collect() for s in mm.samples if s.name == "ckptd_train_metric"}
    assert names == {f"m{i}" for i in range(metricsmod.MAX_TRAIN_METRICS)}
    m.train_metrics({"m0": 7.0, "late": 1.0})
    assert value(reg, "ckptd_train_metric", name="m0") == 7.0
    assert value(reg, "ckptd_train_metric", name="late") is None
    assert "late" in m.status()["train_metrics_refused"]


@pytest.mark.parametrize("state, stopping, code, shown, healthy", [
    ("idle", False, None, "starting", True), ("running", False, None, "running", True),
    ("backoff", False, None, "backoff", True), ("running", True, None, "stopping", False),
    ("stopping", True, None, "stopping", False), ("exited", True, 85, "stopped", False),
    ("exited", False, 0, "finished", False), ("fatal", False, 70, "gave_up", False)])
def test_run_state_and_health(state, stopping, code, shown, healthy):
    clock, reg, m = fresh()
    m.publish(state=state, stopping=stopping, exit_code=code, step=None, last_checkpoint=None, valid=0)
    assert value(reg, "ckptd_state", state=shown) == 1 and m.healthy is healthy
    assert sum(value(reg, "ckptd_state", state=s) for s in metricsmod.STATES) == 1


from fixtures.slow_clients import Drippers  # noqa: E402
from fixtures.sup_helpers import http_get, wait_for  # noqa: E402

get = http_get


def test_the_endpoint_serves_metrics_and_healthz_only_and_a_busy_port_is_reported_not_raised():
    clock, reg, m = fresh()
    server = MetricsServer(reg, lambda: m.healthy)
    endpoint = server.start("127.0.0.1:0")
    try:
        assert endpoint.state == "serving" and not endpoint.addr.endswith(":0")
        base = f"http://{endpoint.addr}"
        code, body = get(base + "/metrics")
        assert code == 200 and b"ckptd_goodput_ratio" in body and b"_created" not in body
        assert get(base + "/healthz")[0] == 200
        m.publish(state="fatal", stopping=False, exit_code=70, step=None, last_checkpoint=None, valid=0)
        assert get(base + "/healthz")[0] == 503
        code, body = get(base + "/status")  # the run's details are for its owner: `ckptd status`, not this port
        assert code == 404 and b"ckptd status" in body
        assert get(base + "/nothing")[0] == 404
        busy = MetricsServer(reg, lambda: True).start(endpoint.addr)
        assert busy.state == "unavailable" and "in use" in busy.error and endpoint.addr in busy.error
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(tuple(metricsmod.split_addr(endpoint.addr)), timeout=1)


def test_the_file_sd_entry_is_prometheus_shaped_and_a_directory_gets_one_file_per_run(tmp_path):
    path = metricsmod.sd_path(str(tmp_path) + os.sep, "run1")
    assert os.path.dirname(path) == str(tmp_path) and path.endswith("-run1.json")
    metricsmod.write_sd_file(path, "0.0.0.0:9477", {})
    entry = json.loads(open(path).read())
    assert entry == [{"targets": [f"{socket.gethostname()}:9477"], "labels": {}}]
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp file left
    metricsmod.remove_sd_file(path)
    metricsmod.remove_sd_file(path)  # gone already: fine
    assert os.listdir(tmp_path) == []



def test_pace_hands_out_turns_in_order_at_the_rate_and_refuses_beyond_the_wait():
    clock = FakeClock()
    slept = []
    pace = metricsmod.Pace(10.0, 0.25, clock=clock.monotonic, sleep=slept.append)
    assert [pace.wait_turn() for _ in range(4)] == [True, True, True, False]  # turns at +0, +0.1, +0.2; +0.3 > 0.25
    assert slept == pytest.approx([0.1, 0.2])
    clock.advance(1.0)  # idle: the next request is served at once
    assert pace.wait_turn() and slept == pytest.approx([0.1, 0.2])


def test_a_scrape_storm_is_paced_and_refused_with_429_while_healthz_stays_free(monkeypatch):
    import concurrent.futures
    import urllib.error
    import urllib.request

    monkeypatch.setattr(metricsmod, "RENDER_RATE", 4.0)
    monkeypatch.setattr(metricsmod, "RENDER_WAIT", 0.5)
    server = MetricsServer(CollectorRegistry(), lambda: True)
    endpoint = server.start("127.0.0.1:0")

    def get(path):
        try:
            with urllib.request.urlopen(f"http://{endpoint.addr}{path}", timeout=10) as r:
                return r.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Retry-After")

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            storm = list(pool.map(get, ["/metrics"] * 8))
        assert storm.count((200, None)) >= 2 and (429, "1") in storm, storm  # 4/s, at most 0.5 s of waiting
        assert all(get("/healthz") == (200, None) for _ in range(20))
    finally:
        server.close()


# --- bounds against slow clients (docs/metrics.md, "Bounds") ------------------------------------------------


def test_a_client_dripping_its_request_is_cut_off_at_the_deadline_of_the_whole_request(monkeypatch):
    """One byte every 0.2 s never lets a single recv() time out; the whole connection still ends at the
    deadline counted from accept."""
    monkeypatch.setattr(metricsmod, "REQUEST_DEADLINE", 2.0, raising=False)
    server = MetricsServer(CollectorRegistry(), lambda: True)
    endpoint = server.start("127.0.0.1:0")
    slow = Drippers(endpoint.addr, 1)
    try:
        t0 = time.monotonic()
        slow.drip()
        assert slow.opened == 1

        def cut():
            slow.drip()
            return slow.cut

        wait_for(cut, 30, "the server to close the slow connection", interval=0.2)
        assert time.monotonic() - t0 >= 2.0  # not before its deadline
        assert get(f"http://{endpoint.addr}/metrics")[0] == 200  # and the server serves on
    finally:
        slow.close()
        server.close()


def test_a_slowloris_flood_holds_a_bounded_number_of_connections_and_threads_and_scrapes_still_succeed(monkeypatch):
    monkeypatch.setattr(metricsmod, "MAX_CONNECTIONS", 8, raising=False)
    me = psutil.Process()
    threads_before = me.num_threads()
    server = MetricsServer(CollectorRegistry(), lambda: True)
    endpoint = server.start("127.0.0.1:0")
    flood = Drippers(endpoint.addr, 200)
    try:
        peak = {"threads": 0}

        def attacked():
            flood.drip()
            peak["threads"] = max(peak["threads"], me.num_threads() - threads_before)
            assert peak["threads"] <= 2 * 8 + 2, peak  # the server thread, and at most 2 x the limit handlers
            return flood.opened >= 600  # three rounds of 200 (re)connections

        wait_for(attacked, 60, "the flood to reconnect 600 times", interval=0.1)
        # a scraper that sends its request at once takes the place of a slow one
        assert get(f"http://{endpoint.addr}/metrics")[0] == 200
        assert get(f"http://{endpoint.addr}/healthz")[0] == 200
        assert server.connections.count() <= 2 * 8
    finally:
        flood.close()
        server.close()
