"""With the real Prometheus server (Debian package `prometheus`, installed by .ci/run): a real `ckptd run`
discovered through file_sd, its metrics arriving and moving across a checkpoint, a crash and restart, and a
preemption stop; /metrics clean under `promtool check metrics`; a constant number of series; and every PromQL
expression of the Grafana dashboard returning data from that run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from ckptd import exitcodes
from fixtures.prom import PROMETHEUS, PROMTOOL
from fixtures.sup_helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "deploy", "grafana"))

if not (PROMETHEUS and PROMTOOL):  # .ci/run installs them; a developer machine may not have them
    if os.environ.get("CI"):
        raise RuntimeError("prometheus/promtool missing in CI: .ci/run should have installed them")
    pytest.skip("needs the Debian package prometheus (apt-get install prometheus)", allow_module_level=True)

from fixtures.metrics_scenario import LINGER, Scenario  # noqa: E402


def substitute(expr: str, instance: str) -> str:
    """Grafana's variables as a user picking this run would set them."""
    return (expr.replace("$__rate_interval", "1m").replace('job=~"$job"', 'job=~"ckptd"')
            .replace('instance=~"$instance"', f'instance=~"{instance}"'))


def test_metrics_arrive_and_move_across_a_checkpoint_a_crash_and_restart_and_a_preemption(tmp_path):
    import generate  # deploy/grafana/generate.py: the dashboard's panels and their PromQL

    sc = Scenario(tmp_path)
    try:
        s = sc.sel
        # 1. Discovered through the file_sd entry the run wrote; the metrics arrive.
        assert sc.wait(f"ckptd_info{{instance=\"{sc.instance}\",job=\"ckptd\",version=\"0.1.0\"}}") == 1
        assert sc.wait(f"ckptd_child_up{s}") == 1
        assert sc.wait(f'ckptd_state{{instance="{sc.instance}",state="running"}}') == 1
        # 2. Checkpoints: counted, and the counter moves with the next one; steps and the loss move too.
        first = sc.wait(f'ckptd_checkpoints_total{{instance="{sc.instance}",kind="periodic",result="ok"}}',
                        lambda v: v >= 1)
        sc.wait(f'ckptd_checkpoints_total{{instance="{sc.instance}",kind="periodic",result="ok"}}',
                lambda v: v > first, what="the next checkpoint")
        assert sc.wait(f"ckptd_last_checkpoint_step{s}", lambda v: v >= 100) % 100 == 0
        assert sc.wait(f"ckptd_valid_checkpoints{s}", lambda v: v >= 1)
        assert sc.wait(f"ckptd_checkpoint_stall_seconds_count{s}", lambda v: v >= 1)
        steps = sc.wait(f"ckptd_steps_total{s}", lambda v: v > 0)
        sc.wait(f"ckptd_steps_total{s}", lambda v: v > steps, what="steps to go on")
        loss = sc.wait(f'ckptd_train_metric{{instance="{sc.instance}",name="loss"}}')
        assert 0 < loss < 0.01  # the fixture's loss is 1/step
        assert 0 < sc.wait(f"ckptd_goodput_ratio{s}", lambda v: v > 0) <= 1
        # 3. /metrics passes promtool's linter with no findings.
        with urllib.request.urlopen(f"http://{sc.instance}/metrics", timeout=5) as r:
            body = r.read()
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint
        # 4. A crash (SIGKILL) past the newest checkpoint: a restart by reason, lost steps, the restore's time,
        #    the trainer up again, steps go on from the checkpoint.
        goodput_before = sc.prom.value(f"ckptd_goodput_ratio{s}")
        sc.crash(lost=20)
        assert sc.wait(f'ckptd_restarts_total{{instance="{sc.instance}",reason="signal"}}', lambda v: v == 1) == 1
        assert sc.wait(f"ckptd_lost_steps_total{s}", lambda v: v >= 20) >= 20  # crash() kills 20 steps past it
        assert sc.wait(f"ckptd_restore_seconds{s}", lambda v: v == v) == pytest.approx(0.01)  # not NaN
        assert sc.wait(f"ckptd_goodput_ratio{s}", lambda v: v < goodput_before, what="goodput to drop")
        assert sc.wait(f"ckptd_child_up{s}", lambda v: v == 1) == 1
        after = sc.wait(f"ckptd_steps_total{s}", lambda v: v > steps)
        sc.wait(f"ckptd_steps_total{s}", lambda v: v > after, what="steps to go on after the restart")
        # 5. A preemption (AWS spot notice): one notice, an emergency checkpoint before the deadline, the run
        #    stopped; the endpoint lingers so Prometheus sees the end, then the run exits 85.
        sc.preempt(lead=20)
        assert sc.wait(f'ckptd_preemption_notices_total{{instance="{sc.instance}",source="aws"}}',
                       lambda v: v == 1) == 1
        assert sc.wait(f'ckptd_checkpoints_total{{instance="{sc.instance}",kind="emergency",result="ok"}}',
                       lambda v: v == 1) == 1
        assert 0 < sc.wait(f"ckptd_emergency_checkpoint_margin_seconds{s}", lambda v: v == v) <= 20
        assert sc.wait(f'ckptd_state{{instance="{sc.instance}",state="stopped"}}', lambda v: v == 1,
                       timeout=LINGER + 5) == 1
        assert sc.prom.value(f"ckptd_child_up{s}") == 0
        assert sc.run.wait(30) == exitcodes.PREEMPTED
        assert os.listdir(sc.sd_dir) == []  # the file_sd entry is gone with the run
        end = time.time()
        # 6. The number of ckptd series never changed while Prometheus scraped the run.
        counts = sc.prom.query_range(f'count({{__name__=~"ckptd_.+", instance="{sc.instance}"}})', sc.t0, end)
        assert len(counts) == 1 and len({v for _, v in counts[0]["values"]}) == 1, counts
        # one per second of the run: checkpoint, crash, restart and stop all inside
        assert len(counts[0]["values"]) >= 5
        # 7. Every PromQL expression of the dashboard evaluates without error and returns data from this run.
        empty = []
        for panel in generate.PANELS:
            for expr, _legend in panel.queries:
                if not sc.prom.query_range(substitute(expr, sc.instance), sc.t0, end):
                    empty.append((panel.title, expr))
        assert not empty, empty
    finally:
        sc.close()


def _sample(body: bytes, line_start: str) -> float | None:
    for line in body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_run_that_ends_stays_discovered_through_its_linger_and_prometheus_scrapes_how_it_ended(tmp_path):
    """The documented many-runs setup: file_sd and `--metrics-linger`. One run stopped by `ckptd stop --wait`,
    one that gives up: each keeps its file_sd entry while it lingers, so Prometheus scrapes its final state
    (`stopped`, `gave_up`: what the shipped alerts look for), its goodput does not move during the linger, both
    sides say why `ckptd run` lives on, and the entry goes with the endpoint when a SIGTERM ends the wait."""
    from fixtures.prom import Prometheus
    from fixtures.sup_helpers import FAST, PLAIN, TRAINER, Run, ckptd, http_get

    linger = 120  # ended by SIGTERM below: never waited out
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    prom = Prometheus(str(tmp_path), str(sd_dir))
    runs: list[Run] = []
    try:
        common = ["--metrics-addr", "127.0.0.1:0", "--metrics-sd-file", f"{sd_dir}/", "--metrics-linger", str(linger),
                  "--notices", "off"]
        stopped = Run(tmp_path, str(tmp_path / "a"), [*FAST, *common, "--every-steps", "50", TRAINER,
                                                       "--steps", "100000000", "--send-metrics"], name="stopped")
        runs.append(stopped)
        inst = stopped.wait_event("start")["metrics"]["addr"]

        def scraped(expr: str, want: float, timeout: float = 60) -> None:
            def ok():
                v = prom.value(expr)
                return v == want
            try:
                wait_for(ok, timeout, expr, interval=0.25)
            except AssertionError:
                raise AssertionError(f"Prometheus never answered {expr} == {want} (last {prom.query(expr)}); "
                                     f"targets {prom.api('targets')['activeTargets']}") from None

        scraped(f'ckptd_state{{instance="{inst}",state="running"}}', 1)
        scraped(f'ckptd_steps_total{{instance="{inst}"}} > bool 0', 1)
        r = ckptd("stop", "--dir", stopped.root, "--wait", timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"serves its final metrics for {linger} s more (--metrics-linger)" in r.stdout, r.stdout
        assert stopped.proc.poll() is None  # lingering
        assert len(os.listdir(sd_dir)) == 1, "the file_sd entry went before the linger ended"
        before = _sample(http_get(f"http://{inst}/metrics")[1], "ckptd_goodput_ratio")
        scraped(f'ckptd_state{{instance="{inst}",state="stopped"}}', 1)
        assert prom.value(f'ckptd_child_up{{instance="{inst}"}}') == 0
        assert _sample(http_get(f"http://{inst}/metrics")[1], "ckptd_goodput_ratio") == before > 0
        st = json.loads(ckptd("status", "--dir", stopped.root, "--json").stdout)
        assert st["metrics"]["goodput_ratio"] == round(before, 4)
        assert f"for {linger} s more (--metrics-linger), then exiting with 85" in stopped.stderr()

        gave_up = Run(tmp_path, str(tmp_path / "b"), [*FAST, *common, PLAIN, "--crash"], name="gave_up")
        runs.append(gave_up)
        inst2 = gave_up.wait_event("start")["metrics"]["addr"]
        gave_up.wait_event("give_up")
        scraped(f'ckptd_state{{instance="{inst2}",state="gave_up"}}', 1)
        assert gave_up.proc.poll() is None and len(os.listdir(sd_dir)) == 2

        stopped.signal(signal.SIGTERM)  # ends the linger
        gave_up.signal(signal.SIGTERM)
        assert stopped.wait(30) == exitcodes.PREEMPTED and gave_up.wait(30) == exitcodes.GAVE_UP
        assert os.listdir(sd_dir) == []
    finally:
        for run in runs:
            run.kill()
        prom.stop()
