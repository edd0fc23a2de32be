"""With the real Prometheus server (Debian package `prometheus`, installed by .ci/run): a real `ckptd run`
discovered through file_sd, its metrics arriving and moving across a checkpoint, a crash and restart, and a
preemption stop; /metrics clean under `promtool check metrics`; a constant number of series; and every PromQL
expression of the Grafana dashboard returning data from that run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from ckptd import exitcodes
from fixtures.prom import PROMETHEUS, PROMTOOL

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
        assert sc.wait(f'ckptd_preemption_notices_total{{instance="{sc.instance}",source="aws"}}', lambda v: v == 1) == 1
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
        assert len(counts[0]["values"]) >= 5  # one per second of the run: checkpoint, crash, restart and stop all inside
        # 7. Every PromQL expression of the dashboard evaluates without error and returns data from this run.
        empty = []
        for panel in generate.PANELS:
            for expr, _legend in panel.queries:
                if not sc.prom.query_range(substitute(expr, sc.instance), sc.t0, end):
                    empty.append((panel.title, expr))
        assert not empty, empty
    finally:
        sc.close()
